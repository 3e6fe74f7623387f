"""The native kernels on PyTorch tensors: what the merge engine calls (see the package docstring)."""

from __future__ import annotations

import torch

from ...io.layout import DTYPES, torch_dtype
from .. import native as _package
from ..torch.ffg import SaliencyHistogram, Score
from ..torch.ops import Curvature
from . import S_FULL, S_MAGNITUDE, S_NONE, S_RANK1, W_FULL, W_RANK1, W_UNIFORM, available, library

__all__ = ["supports", "SaliencyCounter", "ota_merge", "magnitude_cuts", "ties_merge"]

_DT = {torch_dtype(c): d.kernel for c, d in DTYPES.items() if d.kernel is not None}  # torch dtype -> kernel code


def supports(*dtypes: torch.dtype) -> bool:
    """Whether the kernels read/write every one of these dtypes."""
    if not available():
        return False
    ok = set(_DT) if library().ota_native_has_f16() else {torch.float32, torch.bfloat16}
    return all(d in ok for d in dtypes)


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def _check(t: torch.Tensor, numel: int, what: str) -> None:
    if not t.is_contiguous() or t.numel() != numel or t.device.type != "cpu":
        raise ValueError(f"native kernel: {what} must be a contiguous CPU tensor of {numel} elements")


_S_MODE = {"rank1": S_RANK1, "full": S_FULL, "magnitude": S_MAGNITUDE}


def _score_arrays(m: int, n: int, scores: list[Score | None]):
    """C arrays of the FFG scores (None: no mask for that expert)."""
    for s in scores:
        if s is None or s.kind == "magnitude":
            continue
        if s.kind == "rank1":
            if s.a.dtype != torch.float64 or s.b.dtype != torch.float64:
                raise ValueError("native kernel: rank-one saliency factors must be float64")
            _check(s.a, m, "saliency row factor")
            _check(s.b, n, "saliency column factor")
        elif s.kind == "full":
            if s.v.dtype != torch.float32:
                raise ValueError("native kernel: full second moments must be float32")
            _check(s.v, m * n, "second moment")
        else:
            raise ValueError(f"native kernel: unknown score {s.kind!r}")
    return (
        [S_NONE if s is None else _S_MODE[s.kind] for s in scores],
        [None if s is None else _addr(s.a) for s in scores],
        [None if s is None else _addr(s.b) for s in scores],
        [None if s is None else _addr(s.v) for s in scores],
    )


def _check_tensors(w0: torch.Tensor, experts: list[torch.Tensor]) -> list[tuple[int, int]]:
    """The experts' (address, dtype code) for the raw kernels, after checking every tensor is a
    contiguous CPU tensor of ``w0``'s (m, n) shape."""
    m, n = w0.shape
    _check(w0, m * n, "base tensor")
    for e in experts:
        _check(e, m * n, "expert tensor")
    return [(e.data_ptr(), _DT[e.dtype]) for e in experts]


class SaliencyCounter:
    """Counts saliencies into one :class:`ota_trainer.backends.torch.ffg.SaliencyHistogram` per expert,
    tensor after tensor, on several threads.

    Each extra thread counts into private bins of its own, allocated once and added into the
    histograms by :meth:`flush` (no shared counters, no per-tensor allocations).
    """

    def __init__(self, hists: list[SaliencyHistogram]):
        self.targets = hists
        self.hists = [h.counts for h in hists]
        self._private: dict[int, list[torch.Tensor]] = {}

    @torch.no_grad()
    def add(self, w0: torch.Tensor, experts: list[torch.Tensor], scores: list[Score | None]) -> None:
        """Count one tensor: ``w0`` and ``experts`` are (m, n) contiguous tensors in their stored
        dtypes; experts whose score is None are skipped."""
        m, n = w0.shape
        eptrs = _check_tensors(w0, experts)
        smode, sa, sb, sv = _score_arrays(m, n, scores)
        hists = []
        for k in range(len(_package.workers(m, m * n, _threads()))):
            own = (
                self.hists
                if k == 0
                else (self._private.get(k) or self._private.setdefault(k, [torch.zeros_like(h) for h in self.hists]))
            )
            hists.append([h.data_ptr() for h in own])
        _package.raw_saliency_hist(w0.data_ptr(), _DT[w0.dtype], m, n, eptrs, smode, sa, sb, sv, hists, _threads())
        for h, s in zip(self.targets, scores):
            if s is not None:
                h.total += m * n

    def flush(self) -> None:
        """Add the private counts into the histograms (before reading their counts)."""
        for own in self._private.values():
            for h, x in zip(self.hists, own):
                h.add_(x)
        self._private.clear()


@torch.no_grad()
def ota_merge(
    w0: torch.Tensor,
    experts: list[torch.Tensor],
    scores: list[Score | None],
    cuts: list[float],
    curvatures: list[Curvature],
    coefs: list[float],
    *,
    epsilon: float,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    share_cuts: list[tuple[float, float] | None] | None = None,
    masses: list[list[float]] | None = None,
) -> tuple[torch.Tensor, list[int], bool]:
    """OTA of one (m, n) tensor with FFG masks ``s >= cuts[t]`` where ``scores[t]`` is not None.

    ``out``: an (m, n) contiguous tensor of ``out_dtype`` to write into (default: a new one).
    ``share_cuts``: per expert None or two cuts (lo, hi): the merge also adds the saliency-share
    rule's masses at or above hi, in [lo, hi) and below lo to ``masses[t]`` (how the runner proves
    a share threshold taken from a histogram it did not count).
    Returns (merged tensor in ``out_dtype``, entries kept per expert, whether every merged value
    is finite)."""
    m, n = w0.shape
    eptrs = _check_tensors(w0, experts)
    smode, sa, sb, sv = _score_arrays(m, n, scores)
    full = [c for c in curvatures if c.v is not None]
    if len({c.sqrt for c in full}) > 1:
        raise ValueError("native kernel: one power for every expert")
    for c in curvatures:
        if c.pa is not None:
            _check(c.pa, m, "curvature row factor")
            _check(c.pb, n, "curvature column factor")
        elif c.v is not None:
            _check(c.v, m * n, "curvature")
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype)
    elif out.dtype != out_dtype:
        raise ValueError(f"native kernel: out is {out.dtype}, expected {out_dtype}")
    _check(out, m * n, "output")
    kept, finite = _package.raw_ota_merge(
        w0.data_ptr(),
        _DT[w0.dtype],
        m,
        n,
        eptrs,
        smode,
        sa,
        sb,
        sv,
        list(cuts),
        [W_RANK1 if c.pa is not None else W_FULL if c.v is not None else W_UNIFORM for c in curvatures],
        [_addr(c.pa) for c in curvatures],
        [_addr(c.pb) for c in curvatures],
        [_addr(c.v) for c in curvatures],
        any(c.sqrt for c in full),
        [c.div for c in curvatures],
        list(coefs),
        epsilon,
        out.data_ptr(),
        _DT[out_dtype],
        _threads(),
        **(
            {
                "checks": [c or (0.0, 0.0) for c in share_cuts],
                "modes": [2 if c else 0 for c in share_cuts],
                "masses": masses,
            }
            if share_cuts is not None
            else {}
        ),
    )
    return out, kept, finite


@torch.no_grad()
def magnitude_cuts(w0: torch.Tensor, experts: list[torch.Tensor], densities: list[float]) -> list[float]:
    """Each task vector's TIES trim threshold over the whole tensor, exactly
    :func:`ota_trainer.backends.torch.ops.magnitude_cut` (``-inf`` keeps all, ``inf`` none): the
    ``round(density * numel)``-th largest ``|e - w0|``, by a two-level radix select."""
    numel = w0.numel()
    eptrs = _check_tensors(w0.reshape(1, -1), [e.reshape(1, -1) for e in experts])
    return _package.raw_magnitude_cuts(w0.data_ptr(), _DT[w0.dtype], numel, eptrs, list(densities), _threads())


@torch.no_grad()
def ties_merge(
    w0: torch.Tensor,
    experts: list[torch.Tensor],
    cuts: list[float],
    coefs: list[float],
    lam: float,
    *,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """TIES of one tensor (exactly :func:`ota_trainer.backends.torch.ops.ties_merge` with these ``cuts``).

    Returns (merged tensor in ``out_dtype``, of ``w0``'s shape, and whether it is finite)."""
    shape, numel = w0.shape, w0.numel()
    eptrs = _check_tensors(w0.reshape(1, -1), [e.reshape(1, -1) for e in experts])
    if out is None:
        out = torch.empty(shape, dtype=out_dtype)
    _check(out, numel, "output")
    finite = _package.raw_ties_merge(
        w0.data_ptr(),
        _DT[w0.dtype],
        numel,
        eptrs,
        list(cuts),
        list(coefs),
        lam,
        out.data_ptr(),
        _DT[out_dtype],
        _threads(),
    )
    return out, finite
