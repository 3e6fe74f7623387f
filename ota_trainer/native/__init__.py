"""Fused native kernels for the merge engine's hot loops (FFG histogram and OTA merge).

``kernels.c`` beside this file is compiled on first use with the machine's C compiler
(``$CC``, else ``cc``/``gcc``/``clang``) into a per-user cache and loaded with :mod:`ctypes`,
so the package stays pure Python and nothing is built at install time. The kernels compute
exactly what the engine's PyTorch path computes (same operations, order and precision, so
the same bits; ``tests/test_native.py``), reading bf16/fp16/fp32 tensors as stored, in one
fused pass per expert entry instead of a dozen tensor-wide ones, on several threads.

Control with ``OTA_TRAINER_NATIVE``: unset or ``auto`` uses the kernels when they build and
falls back to PyTorch (with one warning) when they do not; ``0`` never uses them; ``1``
requires them (an error if they cannot be built). The cache folder is
``$OTA_TRAINER_CACHE/kernels`` (default ``~/.cache/ota_trainer/kernels``).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..aggregate import Curvature, _select_from_top
from ..graft import SaliencyHistogram, Score

logger = logging.getLogger(__name__)

__all__ = ["available", "why_unavailable", "supports", "SaliencyCounter", "ota_merge", "magnitude_cuts", "ties_merge", "MAX_TIES_EXPERTS", "NativeUnavailable"]

SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
MAX_TIES_EXPERTS = 16  # the TIES kernel's stack buffer
# fewer entries than this in a call: one thread (thread hand-off costs more than it saves)
MIN_PARALLEL = 1 << 16

_VERSION = 6  # ota_native_version() of kernels.c
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
S_NONE, S_RANK1, S_FULL, S_MAGNITUDE = 0, 1, 2, 3
W_UNIFORM, W_RANK1, W_FULL = 0, 1, 2

_i64, _int, _f32, _f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double
_ptr = ctypes.c_void_p
_ptrs = ctypes.POINTER(ctypes.c_void_p)
_ints = ctypes.POINTER(ctypes.c_int)


class NativeUnavailable(RuntimeError):
    """``OTA_TRAINER_NATIVE=1`` but the kernels cannot be built or loaded here."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why: str | None = None
_tried = False
_warned = False
_pool: ThreadPoolExecutor | None = None


def _mode() -> str:
    mode = os.environ.get("OTA_TRAINER_NATIVE", "auto").strip().lower()
    return {"": "auto", "true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}.get(mode, mode)


def _cache_dir() -> Path:
    root = os.environ.get("OTA_TRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ota_trainer"
    )
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for cc in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(cc)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU is not loaded on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _build(cc: str) -> Path:
    """Compile ``kernels.c`` into the cache (once per source, compiler and CPU); returns the library."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + cc.encode() + " ".join(CFLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    out = _cache_dir() / f"ota_kernels-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # compile beside it, rename: concurrent builds are safe
    os.close(fd)
    try:
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise OSError(f"{cc} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    lib.ota_native_version.restype = _int
    lib.ota_native_has_f16.restype = _int
    lib.ota_saliency_hist.restype = None
    lib.ota_saliency_hist.argtypes = [_ptr, _int, _int, _ptrs, _ints, _i64, _i64, _i64, _ints, _ptrs, _ptrs, _ptrs, _ptrs]
    lib.ota_abs_hist.restype = None
    lib.ota_abs_hist.argtypes = [_ptr, _int, _int, _ptrs, _ints, _i64, _i64, _ptr, _ptrs]
    lib.ota_ties.restype = _int
    lib.ota_ties.argtypes = [_ptr, _int, _int, _ptrs, _ints, _i64, _i64, _ptr, _ptr, _f32, _ptr, _int]
    lib.ota_merge_rows.restype = _int
    lib.ota_merge_rows.argtypes = [
        _ptr, _int, _int, _ptrs, _ints, _i64, _i64, _i64,  # w0, dt0, T, e, dte, n, r0, r1
        _ints, _ptrs, _ptrs, _ptrs, _ptr,  # smode, sa, sb, sv, cut
        _ints, _ptrs, _ptrs, _ptrs, _int, _ptr,  # wmode, pa, pb, wv, sqrt_p, pdiv
        _f32, _f32, _ptr, _ptr, _int, _ptr,  # eps, uniform, coef, out, dto, kept
    ]


def _load() -> ctypes.CDLL | None:
    global _lib, _why, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = _compiler()
        try:
            if cc is None:
                raise OSError("no C compiler (set CC, or install gcc or clang)")
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
            if lib.ota_native_version() != _VERSION:
                raise OSError("stale kernel library in the cache")
            _lib = lib
        except (OSError, subprocess.SubprocessError) as e:
            _why = str(e)
            _lib = None
        return _lib


def available() -> bool:
    """Whether the engine uses the native kernels (see ``OTA_TRAINER_NATIVE``).

    Raises:
        NativeUnavailable: ``OTA_TRAINER_NATIVE=1`` and they cannot be built.
    """
    mode = _mode()
    if mode == "0":
        return False
    lib = _load()
    if lib is None:
        if mode == "1":
            raise NativeUnavailable(f"OTA_TRAINER_NATIVE=1 but the native kernels are unavailable: {_why}")
        global _warned
        if not _warned:
            _warned = True
            logger.warning("native merge kernels unavailable (%s); using the PyTorch path (same results, slower)", _why)
        return False
    return True


def why_unavailable() -> str | None:
    _load()
    return _why


def supports(*dtypes: torch.dtype) -> bool:
    """Whether the kernels read/write every one of these dtypes."""
    lib = _load()
    if lib is None:
        return False
    ok = set(_DT) if lib.ota_native_has_f16() else {torch.float32, torch.bfloat16}
    return all(d in ok for d in dtypes)


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _arr(ctype, values):
    return (ctype * len(values))(*values)


def _workers(rows: int, numel: int) -> list[tuple[int, int]]:
    """Contiguous ranges of ``rows`` rows (or elements: ``rows = numel``), one per thread
    (torch's intra-op thread count)."""
    k = max(1, min(torch.get_num_threads(), rows, numel // MIN_PARALLEL if numel >= 2 * MIN_PARALLEL else 1))
    step = -(-rows // k)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def _run(calls):
    """Run zero-argument callables on the thread pool (ctypes releases the GIL) and return their results."""
    global _pool
    if len(calls) == 1:
        return [calls[0]()]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(2, torch.get_num_threads()), thread_name_prefix="ota-native")
    return [f.result() for f in [_pool.submit(c) for c in calls]]


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
        _arr(_int, [S_NONE if s is None else _S_MODE[s.kind] for s in scores]),
        _arr(_ptr, [None if s is None else _addr(s.a) for s in scores]),
        _arr(_ptr, [None if s is None else _addr(s.b) for s in scores]),
        _arr(_ptr, [None if s is None else _addr(s.v) for s in scores]),
    )


def _tensor_arrays(w0: torch.Tensor, experts: list[torch.Tensor]):
    m, n = w0.shape
    _check(w0, m * n, "base tensor")
    for e in experts:
        _check(e, m * n, "expert tensor")
    return _arr(_ptr, [e.data_ptr() for e in experts]), _arr(_int, [_DT[e.dtype] for e in experts])


class SaliencyCounter:
    """Counts saliencies into one :class:`ota_trainer.graft.SaliencyHistogram` per expert,
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
        lib = _load()
        m, n = w0.shape
        eptr, edt = _tensor_arrays(w0, experts)
        smode, sa, sb, sv = _score_arrays(m, n, scores)

        def call(k: int, r0: int, r1: int):
            if k == 0:
                own = self.hists
            else:
                own = self._private.get(k) or self._private.setdefault(k, [torch.zeros_like(h) for h in self.hists])
            hp = _arr(_ptr, [h.data_ptr() for h in own])
            return lambda: lib.ota_saliency_hist(w0.data_ptr(), _DT[w0.dtype], len(experts), eptr, edt, n, r0, r1, smode, sa, sb, sv, hp)

        _run([call(k, r0, r1) for k, (r0, r1) in enumerate(_workers(m, m * n))])
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
) -> tuple[torch.Tensor, list[int], bool]:
    """OTA of one (m, n) tensor with FFG masks ``s >= cuts[t]`` where ``scores[t]`` is not None.

    ``out``: an (m, n) contiguous tensor of ``out_dtype`` to write into (default: a new one).
    Returns (merged tensor in ``out_dtype``, entries kept per expert, whether every merged value
    is finite)."""
    lib = _load()
    m, n = w0.shape
    T = len(experts)
    eptr, edt = _tensor_arrays(w0, experts)
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
    wmode = _arr(_int, [W_RANK1 if c.pa is not None else W_FULL if c.v is not None else W_UNIFORM for c in curvatures])
    pa, pb, wv = (_arr(_ptr, [_addr(getattr(c, k)) for c in curvatures]) for k in ("pa", "pb", "v"))
    sqrt_p = int(any(c.sqrt for c in full))
    cut, pdiv, coef = _arr(_f64, cuts), _arr(_f32, [c.div for c in curvatures]), _arr(_f32, coefs)
    uniform = float(torch.tensor(1.0 + epsilon, dtype=torch.float32))
    eps32 = float(torch.tensor(epsilon, dtype=torch.float32))
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype)
    elif out.dtype != out_dtype:
        raise ValueError(f"native kernel: out is {out.dtype}, expected {out_dtype}")
    _check(out, m * n, "output")
    ranges = _workers(m, m * n)
    kept = [_arr(_i64, [0] * T) for _ in ranges]

    def call(k: int, r0: int, r1: int):
        return lambda: lib.ota_merge_rows(
            w0.data_ptr(), _DT[w0.dtype], T, eptr, edt, n, r0, r1, smode, sa, sb, sv, ctypes.addressof(cut),
            wmode, pa, pb, wv, sqrt_p, ctypes.addressof(pdiv), eps32, uniform, ctypes.addressof(coef),
            out.data_ptr(), _DT[out_dtype], ctypes.addressof(kept[k]),
        )

    bad = _run([call(k, r0, r1) for k, (r0, r1) in enumerate(ranges)])
    return out, [sum(int(kk[t]) for kk in kept) for t in range(T)], not any(bad)


@torch.no_grad()
def magnitude_cuts(w0: torch.Tensor, experts: list[torch.Tensor], densities: list[float]) -> list[float]:
    """Each task vector's TIES trim threshold over the whole tensor, exactly
    :func:`ota_trainer.aggregate.magnitude_cut` (``-inf`` keeps all, ``inf`` none): the
    ``round(density * numel)``-th largest ``|e - w0|``, by a two-level radix select."""
    lib = _load()
    numel = w0.numel()
    w0, experts = w0.reshape(1, -1), [e.reshape(1, -1) for e in experts]
    eptr, edt = _tensor_arrays(w0, experts)
    cuts: list[float | None] = []
    ks = []
    for p in densities:
        k = int(round(p * numel))
        ks.append(k)
        cuts.append(-math.inf if k >= numel else math.inf if k <= 0 else None)
    todo = [t for t, c in enumerate(cuts) if c is None]
    if not todo:
        return cuts
    T = len(experts)
    ranges = _workers(numel, numel)

    def count(bins: int, bucket) -> list[torch.Tensor]:
        parts = [[torch.zeros(bins, dtype=torch.int64) for _ in range(T)] for _ in ranges]
        calls = []
        for (r0, r1), hs in zip(ranges, parts):
            hp = _arr(_ptr, [h.data_ptr() for h in hs])
            calls.append(lambda r0=r0, r1=r1, hp=hp: lib.ota_abs_hist(
                w0.data_ptr(), _DT[w0.dtype], T, eptr, edt, r0, r1, bucket, hp))
        _run(calls)
        return [sum(p[t] for p in parts) for t in range(T)]

    hi = count(1 << 15, None)
    picks = {t: _select_from_top(hi[t], ks[t]) for t in todo}
    buckets = _arr(_i64, [picks[t][0] if t in picks else -1 for t in range(T)])
    lo = count(1 << 16, ctypes.addressof(buckets))
    for t in todo:
        bucket, rank = picks[t]
        low, _ = _select_from_top(lo[t], rank)
        cuts[t] = float(torch.tensor((bucket << 16) | low, dtype=torch.int32).view(torch.float32))
    return cuts


@torch.no_grad()
def ties_merge(
    w0: torch.Tensor, experts: list[torch.Tensor], cuts: list[float], coefs: list[float], lam: float,
    *, out_dtype: torch.dtype, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """TIES of one tensor (exactly :func:`ota_trainer.aggregate.ties_merge` with these ``cuts``).

    Returns (merged tensor in ``out_dtype``, of ``w0``'s shape, and whether it is finite)."""
    lib = _load()
    if len(experts) > MAX_TIES_EXPERTS:
        raise ValueError(f"native TIES merges at most {MAX_TIES_EXPERTS} experts")
    shape, numel = w0.shape, w0.numel()
    w0f, flat = w0.reshape(1, -1), [e.reshape(1, -1) for e in experts]
    eptr, edt = _tensor_arrays(w0f, flat)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype)
    _check(out, numel, "output")
    cut, coef = _arr(_f32, cuts), _arr(_f32, coefs)
    lam32 = float(torch.tensor(lam, dtype=torch.float32))
    calls = [
        (lambda r0=r0, r1=r1: lib.ota_ties(w0f.data_ptr(), _DT[w0.dtype], len(experts), eptr, edt, r0, r1,
                                           ctypes.addressof(cut), ctypes.addressof(coef), lam32, out.data_ptr(), _DT[out_dtype]))
        for r0, r1 in _workers(numel, numel)
    ]
    return out, not any(_run(calls))
