"""The PyTorch backend: every method's reference math, tensor by tensor, on memory-mapped inputs.

It covers every recipe. Each tensor is handed to its method as a :class:`TensorJob` (the raw
``(m, n)`` views of base and experts, the experts' moments, FFG thresholds, a reusable output
buffer and a block loop): element-wise chains run in row blocks of ~2 MB float32 temporaries that
stay in cache, and, where the native kernels read the tensor's dtypes, ``job.native_ops`` runs
a method's hot loop natively on the same tensors (same bits). Parts: FFG saliencies and
histograms (:mod:`.ffg`), shared tensor helpers (:mod:`.ops`).

Imported only when the runner chooses this backend (or a merge needs an explanation only
PyTorch gives: which input is not finite).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ...errors import NumericalError, brief
from ...io.checkpoint import ModelFolder
from ...io.layout import matrix_view
from ...moments.format import MomentsReader, all_finite
from .. import native
from ..thresholds import Histogram, Threshold
from .ffg import SaliencyHistogram, Score
from .ops import Curvature

logger = logging.getLogger(__name__)

__all__ = [
    "TorchBackend",
    "TensorJob",
    "count_saliencies",
    "moment_view",
    "saliency_score",
    "row_blocks",
    "BLOCK_ELEMENTS",
]

# Tensors are merged in row blocks of this many entries: the chain of element-wise operations
# then works on ~2 MB float32 temporaries that stay in cache and are reused by the allocator,
# instead of streaming whole-tensor temporaries through memory (measured ~3x faster).
BLOCK_ELEMENTS = 1 << 19


def row_blocks(m: int, n: int) -> list[slice]:
    """Row ranges of an (m, n) view holding about ``BLOCK_ELEMENTS`` entries each."""
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    return [slice(s, min(s + step, m)) for s in range(0, m, step)]


def curvatures(moments: list, power: float, normalise: str) -> list[Curvature]:
    """Each expert's ``P = v**power`` for one tensor, from :meth:`TensorJob.moment`'s results;
    uniform curvature for every expert when any of them lacks moments for it."""
    if any(mo is None for mo in moments):
        return [Curvature() for _ in moments]
    return [
        Curvature.rank1(*mo, power, normalise) if isinstance(mo, tuple) else Curvature.full(mo, power, normalise)
        for mo in moments
    ]


def moment_view(
    moments: MomentsReader | None, name: str, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None:
    """An expert's second moment of ``name`` for its (m, n) view ``shape``: rank-one factors
    ``(a, b)``, the full float32 ``v``, or None (no moments for it)."""
    if moments is None or name not in moments:
        return None
    ab = moments.rank1(name)
    if ab is not None:
        return ab
    return moments[name].reshape(shape).contiguous()


def saliency_score(moment, score: str | None) -> Score | None:
    """FFG saliency of an expert's edits of one tensor, from :func:`moment_view`'s result and the
    recipe's ``score``; None when FFG keeps it whole (no moments)."""
    if score == "magnitude":
        return Score("magnitude")
    if moment is None:
        return None
    return Score.rank1(*moment) if isinstance(moment, tuple) else Score("full", v=moment)


@torch.no_grad()
def count_saliencies(tensors: Iterable[tuple[torch.Tensor, list[torch.Tensor], list[Score | None]]], k: int):
    """``k`` experts' FFG saliencies counted into a histogram each, tensor after tensor: ``tensors``
    yields each tensor's base and expert values as contiguous (m, n) views in their stored dtypes,
    and each expert's :class:`~.ffg.Score` (None: not counted). The native kernels count where
    they read the dtypes (same bins, several threads), PyTorch in row blocks elsewhere.

    Returns:
        A :class:`~ota_trainer.backends.thresholds.Histogram` per expert."""
    hists = [SaliencyHistogram() for _ in range(k)]
    ops = counter = None
    if native.available():
        from ..native import ops

        counter = ops.SaliencyCounter(hists)
    for w0r, experts, scores in tensors:
        if counter is not None and ops.supports(w0r.dtype, *(e.dtype for e in experts)):
            counter.add(w0r, experts, scores)
            continue
        for rows in row_blocks(*w0r.shape):
            w0 = w0r[rows].float()
            for h, e, sc in zip(hists, experts, scores):
                if sc is not None:
                    h.add(sc.block(torch.sub(e[rows], w0), rows))
    if counter is not None:
        counter.flush()
    return [Histogram.from_dense(memoryview(h.counts.numpy()).cast("B").cast("q"), h.total) for h in hists]


class TorchBackend:
    """Merges with PyTorch (see the module docstring); one instance per merge.

    Args:
        recipe: the :class:`~ota_trainer.merger.recipe.MergeRecipe`.
        inputs: its :class:`~ota_trainer.merger.inputs.MergeInputs`, opened and checked.
        quiet: no progress bars.
    """

    name = "PyTorch"

    def __init__(self, recipe, inputs, *, quiet: bool = False):
        self.recipe, self.method, self.quiet = recipe, recipe.spec, quiet
        self.params = recipe.method_parameters()
        self.tensor_params = recipe.per_tensor(inputs.template.names)  # each expert's, per tensor
        self.experts = [ModelFolder(e) for e in inputs.experts]
        self.base = ModelFolder(inputs.base) if inputs.base else None
        self.template = self.base or self.experts[0]
        self.grafting = recipe.grafting()
        self.moments: list[MomentsReader | None] = [
            None
            if m is None
            else MomentsReader(m, bias_correction=self.params.get("bias_correction", True), model=e.label)
            for m, e in zip(inputs.moments, inputs.experts)
        ]
        self.thresholds: list[Threshold | None] = [None] * len(self.experts)
        self._arena: torch.Tensor | None = None

    @staticmethod
    def covers(recipe, inputs) -> str | None:
        """Every recipe: each method declares its PyTorch math."""
        return None

    def set_thresholds(self, thresholds: list[Threshold | None]) -> None:
        """Each expert's FFG threshold (None: per tensor, or no FFG)."""
        self.thresholds[:] = thresholds

    def start_reads(self) -> None:
        """Ask the kernel for every input in the order the passes read them (hints only)."""
        from ...io import readahead

        models = ([self.base] if self.base else []) + self.experts
        moments = [None] * (len(models) - len(self.experts)) + list(self.moments)
        readahead.start([f.files + ([m.path] if m is not None else []) for f, m in zip(models, moments)])

    # -- reading ----------------------------------------------------------------------------------
    def prefetch(self, names: list[str], folders: Sequence[ModelFolder]) -> None:
        """Start the disk reads of the next tensor while this one is merged (page-cache hints only)."""
        for name in names:
            for f in folders:
                f.prefetch(name)
            for m in self.moments:
                if m is not None and name in m:
                    m.prefetch(name)

    def raw(self, folder: ModelFolder, name: str) -> torch.Tensor:
        """One tensor as stored, in its (m, n) view: a read-only map of the file (only read)."""
        return folder.view(name).reshape(matrix_view(self.template.tensors[name].shape))

    def moment(self, i: int, name: str) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None:
        """Expert i's second moment of ``name`` (:func:`moment_view`)."""
        return moment_view(self.moments[i], name, matrix_view(self.template.tensors[name].shape))

    def score(self, moment) -> Score | None:
        """FFG saliency of an expert's edits of one tensor (:func:`saliency_score`)."""
        return saliency_score(moment, self.params.get("score"))

    def native_ops(self, name: str, folders: Sequence[ModelFolder], out_dtype: torch.dtype | None = None):
        """The native kernels' PyTorch adapters when they read (and write) this tensor's dtypes, else None."""
        dtypes = [f.tensors[name].dtype for f in folders] + ([out_dtype] if out_dtype is not None else [])
        if not native.available():
            return None
        from ..native import ops

        return ops if ops.supports(*dtypes) else None

    def out_dtype(self, name: str) -> torch.dtype:
        info = self.template.tensors[name]
        if self.recipe.dtype and info.dtype.is_floating_point:
            return getattr(torch, self.recipe.dtype)
        return info.dtype

    # -- FFG's first pass -------------------------------------------------------------------------
    def histograms(self, experts: list[int], names: list[str]) -> list[Histogram]:
        """Every listed expert's saliencies over ``names`` counted into its histogram."""
        folders = [self.experts[i] for i in experts]

        def tensors():
            for k, name in enumerate(tqdm(names, desc="FFG thresholds", unit="tensor", disable=self.quiet)):
                self.prefetch(names[k + 1 : k + 2], [self.base] + folders)
                scores = [self.score(self.moment(i, name)) for i in experts]
                yield self.raw(self.base, name), [self.raw(f, name) for f in folders], scores

        return count_saliencies(tensors(), len(experts))

    # -- the merge ------------------------------------------------------------------------------------
    def merge_tensor(
        self, name: str, nxt: list[str], out: memoryview | None = None
    ) -> tuple[memoryview, list[int] | None]:
        """Tensor ``name`` merged by its method: its bytes in the output dtype (valid until the next
        call) and, for a grafting method, the entries each expert's mask kept. ``nxt``: the
        tensors merged next, whose disk reads may start now. ``out`` is not used (PyTorch's ops
        allocate their results; the writer copies them)."""
        self.prefetch(nxt, ([self.base] if self.base else []) + self.experts)
        job = TensorJob(self, name)
        merged = self.method.torch(job)
        data = memoryview(merged.contiguous().reshape(-1).view(torch.uint8).numpy())
        return data, job.kept

    def raw_bytes(self, name: str) -> memoryview:
        """A tensor copied from the template as stored (integer buffers)."""
        return memoryview(self.template.get(name).reshape(-1).view(torch.uint8).numpy())

    def release(self, name: str) -> None:
        """Nothing to drop: a tensor's mapping goes with its views."""

    def out_buffer(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        """Memory for output tensor ``name`` in its (m, n) view, reused from tensor to tensor (the
        writer copies each tensor out before the next is merged): no fresh pages per tensor."""
        dtype = self.out_dtype(name)
        nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
        if self._arena is None or self._arena.numel() < nbytes:
            self._arena = None  # free the old one first
            self._arena = torch.empty(nbytes, dtype=torch.uint8)
        return self._arena[:nbytes].view(dtype).view(shape)

    def explain_non_finite(self, name: str):
        """The merge of ``name`` is not finite: find the input responsible and raise NumericalError."""
        largest = []  # every input is finite: which of them is large enough to overflow float32 arithmetic
        for folder in ([self.base] if self.base else []) + self.experts:
            t = folder.get(name)
            if not torch.isfinite(t).all():
                raise NumericalError(
                    f"{folder.label}: tensor {brief(name)} holds NaN or Inf", tensor=name, model=folder.label
                )
            largest.append((float(t.abs().max()) if t.numel() else 0.0, f"{folder.label}'s weights"))
        for m, e in zip(self.moments, self.experts):
            if m is not None and name in m:
                v = m[name]  # raises NumericalError naming the file for NaN/Inf/negative moments
                largest.append(
                    (float(v.max()) if v.numel() else 0.0, f"{e.label}'s moments (x{m.scale:.3g} bias correction)")
                )
        value, who = max(largest)
        raise NumericalError(
            f"merged tensor {brief(name)} overflows float32 although every input is finite: the largest input value is "
            f"{value:.3g} ({who}); no trained model has values near float32's limit (3.4e38), so that input is damaged "
            f"(or the method's parameters, {brief(self.params)}, scale it past the limit)",
            tensor=name,
        )

    def close(self) -> None:
        for f in ([self.base] if self.base else []) + self.experts + [m for m in self.moments if m is not None]:
            f.close()


class TensorJob:
    """One tensor as a method's PyTorch math sees it (see
    :mod:`ota_trainer.merger.methods.base`).

    Attributes:
        name: the tensor's name. ``m``, ``n``: its (m, n) view.
        w0: the base's tensor as stored, (m, n), read-only (None without a base).
        experts: the experts' tensors as stored, (m, n), read-only.
        params: the method-wide parameters; ``model_params``: each expert's; ``coefs``: each
            expert's ``weight``.
        out_dtype: the output dtype.
        grafting: whether FFG masks the experts' edits; ``thresholds``: each expert's global or
            absolute FFG threshold (None: per tensor, or no FFG).
        native_ops: the native kernels' PyTorch adapters when they read these dtypes, else None.
        kept: set by a grafting method: the entries each expert's mask kept.
    """

    def __init__(self, backend: TorchBackend, name: str):
        self._b = backend
        self.name = name
        self.m, self.n = matrix_view(backend.template.tensors[name].shape)
        self.w0 = backend.raw(backend.base, name) if backend.base else None
        self.experts = [backend.raw(e, name) for e in backend.experts]
        self.params, self.model_params = backend.params, backend.tensor_params(name)
        self.coefs = [p["weight"] for p in self.model_params]
        self.out_dtype = backend.out_dtype(name)
        self.grafting, self.thresholds = backend.grafting, backend.thresholds
        self.native_ops = backend.native_ops(
            name, ([backend.base] if backend.base else []) + backend.experts, self.out_dtype
        )
        self.kept: list[int] | None = None

    def moment(self, i: int):
        """Expert i's second moment of this tensor: ``(a, b)`` rank-one factors, the (m, n) ``v``, or None."""
        return self._b.moment(i, self.name)

    def score(self, moment) -> Score | None:
        """Its FFG saliency (by the recipe's ``score``), or None without moments."""
        return self._b.score(moment)

    def curvatures(self, power: float, normalise: str) -> list[Curvature]:
        """Every expert's ``P = v**power`` for this tensor (uniform for all when any lacks moments)."""
        return curvatures([self.moment(i) for i in range(len(self.experts))], power, normalise)

    def out(self) -> torch.Tensor:
        """The reusable (m, n) output buffer in the output dtype."""
        return self._b.out_buffer(self.name, (self.m, self.n))

    def blockwise(self, block: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """The output from ``block(rows)`` (float32, checked finite) row block by row block, in the
        output buffer."""
        out = self.out()
        for rows in row_blocks(self.m, self.n):
            out[rows] = self.finish(block(rows))
        return out

    def finish(self, merged: torch.Tensor) -> torch.Tensor:
        """``merged`` if finite; otherwise the input responsible is found and named (raises)."""
        if not all_finite(merged):
            self.non_finite()
        return merged

    def non_finite(self) -> Any:
        """Raise the NumericalError naming what made this tensor's merge non-finite."""
        self._b.explain_non_finite(self.name)
