"""FFG's first pass (the saliency histograms) started before PyTorch has loaded.

When the merge CLI cannot use the native fast path (:mod:`.fastpath`: e.g. ``normalise: mean``
or another ``power``), it loads PyTorch and runs the engine; loading PyTorch takes a second or
more of CPU. If the recipe needs FFG's first pass, this module runs it meanwhile: the fast
path's readers (headers, moments, rank-one factors) and one kernel call that does the whole
pass on threads of its own (the GIL is released throughout, and each thread drops the pages it
has counted from its maps, so resident memory stays at about one tensor).

    scan = prescan.start(recipe)      # before `import torch`: a thread, or None
    ...
    found = prescan.take(base_dir, expert_dirs, score=..., bias_correction=...)   # the engine

The engine takes the histograms only when everything they depend on matches what it would
read itself (folders, score, bias correction, every input file's size and mtime); otherwise,
or when the scan declined (no native kernels, remote models, moments it does not read, any
error), it counts itself. The counts are the engine's own, bit for bit: same kernel, same
factors (``tests/test_prescan.py``).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import fastpath
from ..backends import native
from .inputs import FLOAT_DTYPES, MergeInputs, ModelLayout, MomentsLayout, open_model, open_moments
from ..io.layout import matrix_view, moments_path, weight_files
from .thresholds import N_BINS

logger = logging.getLogger(__name__)

__all__ = ["start", "take", "Scan"]

_lock = threading.Lock()
_scans: list["Scan"] = []


@dataclass
class Scan:
    """One early first pass; :func:`take` hands its result to the engine."""

    key: tuple
    thread: threading.Thread | None = None
    counts: list[mmap.mmap] = field(default_factory=list)  # per expert, int64[N_BINS]
    totals: list[int] = field(default_factory=list)
    error: str | None = None

    def wait(self) -> bool:
        if self.thread is not None:
            self.thread.join()
        return self.error is None


def _signature(paths: list[Path]) -> tuple:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _prepare(base: ModelLayout, experts: list[ModelLayout], moments: list[MomentsLayout | None], score: str,
             bias_correction: bool, maps: fastpath._Maps, keep: list):
    """The kernel's arguments for the first pass over every float tensor of the base, in file
    order, read and prepared as the fast path reads them (so as the engine does), from inputs
    opened and checked by :mod:`ota_trainer.merger.inputs`."""
    lib = native.library()
    floats = {"F32", "BF16", "F16"} if lib.ota_native_has_f16() else {"F32", "BF16"}
    bf, efs = base, experts
    if score != "magnitude" and any(m is None for m in moments):
        raise fastpath.Decline("an expert without moments")
    moments = [None if score == "magnitude" else fastpath._Moments(m, bias_correction) for m in moments]
    odd = [n for n, t in bf.tensors.items() if t.dtype not in floats and t.dtype in FLOAT_DTYPES]
    if odd:
        raise fastpath.Decline(f"{bf.label}: {odd[0]!r} is {bf.tensors[odd[0]].dtype}, which the kernels do not read")
    names = [n for n in bf.names if bf.tensors[n].dtype in floats]
    T = len(experts)  # noqa: N806
    w0, dt0, ms, ns = [], [], [], []
    e_ptr, e_dt, smode, sa, sb, sv = [], [], [], [], [], []
    totals = [0] * T
    for name in names:
        t = bf.tensors[name]
        m, n = matrix_view(t.shape)
        w0.append(maps.addr(bf.file(name), t.start))
        dt0.append(native.DT_CODES[t.dtype])
        ms.append(m)
        ns.append(n)
        for k, (ef, mom) in enumerate(zip(efs, moments)):
            et = ef.tensors[name]  # checked: same names and shapes as the base, a float dtype
            if et.dtype not in floats:
                raise fastpath.Decline(f"{ef.label}: {name!r} is {et.dtype}, which the kernels do not read")
            e_ptr.append(maps.addr(ef.file(name), et.start))
            e_dt.append(native.DT_CODES[et.dtype])
            if mom is None:
                mode, a, b, v = native.S_MAGNITUDE, None, None, None
            elif name not in mom.stored:
                mode, a, b, v = native.S_NONE, None, None, None  # no moments for it: FFG keeps it whole
            else:
                factors = fastpath._Factors(maps, mom, name, m, n, False, lib)
                keep.append(factors)
                mode, a, b, v = factors.score(False)
            smode.append(mode)
            sa.append(a)
            sb.append(b)
            sv.append(v)
            if mode != native.S_NONE:
                totals[k] += m * n
    arr, P, I, L = native._arr, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64  # noqa: N806
    args = (len(names), T, arr(P, w0), arr(I, dt0), arr(P, e_ptr), arr(I, e_dt), arr(L, ms), arr(L, ns), arr(I, smode),
            arr(P, sa), arr(P, sb), arr(P, sv))
    keep += args[2:]
    return args, totals


def _count(scan: Scan, args: tuple, totals: list[int], maps: fastpath._Maps, keep: list) -> None:
    """Run the kernel (GIL released throughout) and keep its histograms on ``scan``."""
    try:
        k, T, w0, dt0, e, edt, ms, ns, smode, sa, sb, sv = args  # noqa: N806
        counts = [mmap.mmap(-1, N_BINS * 8) for _ in range(T)]  # zero pages until counted into
        views = [ctypes.c_char.from_buffer(c) for c in counts]
        hist = native._arr(ctypes.c_void_p, [ctypes.addressof(v) for v in views])
        rc = native.library().ota_saliency_hist_model(
            k, T, w0, dt0, e, edt, ctypes.addressof(ms), ctypes.addressof(ns), smode, sa, sb, sv, os.cpu_count() or 1, 1, hist,
        )
        del views, hist
        if rc != 0:
            raise fastpath.Decline("the kernel could not allocate its bins")
        scan.counts, scan.totals = counts, totals
    except Exception as e:  # noqa: BLE001 - the engine reads the inputs itself and reports problems properly
        scan.error = f"{type(e).__name__}: {e}"
    finally:
        keep.clear()
        maps.close()


def _key(base: Path, experts: list[Path], score: str, bias_correction: bool) -> tuple:
    paths = [Path(os.path.realpath(p)) for p in [base] + experts]
    inputs = []
    for p in paths:
        inputs += list(weight_files(p, str(p)).values())
    if score != "magnitude":
        inputs += [moments_path(e) for e in experts]
    return (str(base.resolve()), tuple(str(e.resolve()) for e in experts), score, bool(bias_correction), _signature(inputs))


def start(recipe, inputs: MergeInputs | None = None) -> Scan | None:
    """Start the first pass of a recipe (a path or a :class:`~ota_trainer.merger.recipe.MergeRecipe`)
    on a thread, when it has one and its models are local folders; None otherwise (and on any
    problem: the engine reports it). ``inputs``: the recipe's inputs, opened and checked already
    (:func:`ota_trainer.merger.inputs.open_inputs`); without them the local folders are opened here,
    through the same checks."""
    try:
        from .recipe import MergeRecipe

        if not isinstance(recipe, MergeRecipe):
            recipe = MergeRecipe.from_yaml(recipe)
        todo = recipe.global_threshold_experts()
        if not todo or not recipe.base_model or not native.available():
            return None
        if inputs is None:
            base_dir = Path(recipe.base_model).expanduser()
            expert_dirs = [Path(recipe.models[i].model).expanduser() for i in todo]
            if not base_dir.is_dir() or not all(e.is_dir() for e in expert_dirs):
                return None
            base = open_model(base_dir)
            experts = [open_model(e) for e in expert_dirs]
            moments = [open_moments(e) for e in experts]
        else:
            base = inputs.base
            experts = [inputs.experts[i] for i in todo]
            moments = [inputs.moments[i] for i in todo]
        p = recipe.method_parameters()
        score, bias = p["score"], p["bias_correction"]
        scan = Scan(_key(base.path, [e.path for e in experts], score, bias))
        maps, keep = fastpath._Maps(), []
        try:  # here, before PyTorch loads: a thread would wait for the GIL behind the import
            args, totals = _prepare(base, experts, moments, score, bias, maps, keep)
        except BaseException:
            keep.clear()
            maps.close()
            raise
        scan.thread = threading.Thread(target=_count, args=(scan, args, totals, maps, keep), name="ota-prescan", daemon=True)
        with _lock:
            _scans.append(scan)
        scan.thread.start()
        return scan
    except Exception as e:  # noqa: BLE001 - a head start only
        logger.debug("no early first pass: %s", e)
        return None


def take(base: Path, experts: list[Path], *, score: str, bias_correction: bool) -> Scan | None:
    """The finished scan of exactly these inputs (waiting for it), removed from the pending ones;
    None when there is none or it declined."""
    with _lock:
        if not _scans:
            return None
    try:
        key = _key(Path(base), [Path(e) for e in experts], score, bias_correction)
    except OSError:
        return None
    with _lock:
        scan = next((s for s in _scans if s.key == key), None)
        if scan is not None:
            _scans.remove(scan)
    if scan is None:
        return None
    if not scan.wait():
        logger.debug("early first pass declined: %s", scan.error)
        return None
    return scan
