"""The merge without PyTorch: the native kernels straight on memory-mapped files.

Loading PyTorch costs the merge CLI one to three seconds of CPU and disk, about as long as
reading a 0.5B-parameter base and two experts. For the recipes the native kernels cover
(below), this module runs the whole merge with the standard library and the kernels alone:
headers from :mod:`.layout`, rank-one factors prepared by a kernel, FFG's histogram and
threshold (:mod:`.thresholds`), OTA or TIES tensor by tensor, the output through the same
writer and the same report, card and side files (:mod:`.report`). It computes exactly what
the engine computes: the same kernels on the same factors and thresholds, so the same bytes
and the same report (``tests/test_fastpath.py``).

Covered: methods ``ota`` (FFG with a global ``density`` or an absolute ``threshold``, or no
FFG; ``score`` fisher or magnitude; ``power`` 1/2 or 1; ``normalise: none``; every float
tensor with moments: rank-one, or stored whole when 1-D) and ``ties``; bf16/fp16/fp32; base
and experts as local folders (or what a resolver makes local). Anything else, any input the
engine would reject, and any non-finite result: :func:`merge` declines (returns None, leaving
nothing behind) and the engine does the merge and the explaining. ``OTA_TRAINER_FAST_PATH=0``
turns it off (the engine then does every merge); ``OTA_TRAINER_NATIVE=0`` does too.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import math
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..backends import native
from ..io import readahead
from .recipe import MergeRecipe, parse_size
from .inputs import MergeInputs, ModelLayout, MomentsLayout, open_inputs
from ..io.layout import COL_SUFFIX, DTYPE_SIZES, ROW_SUFFIX, matrix_view, row_total
from .report import ExpertReport, MergeReport, copy_side_files, finish, local_resolver
from .thresholds import N_BINS, bin_edge, density_bin
from ..io.write import OutputDir, StreamingSafetensorsWriter, output_for

logger = logging.getLogger(__name__)

__all__ = ["merge", "Decline"]

_KERNEL_DTYPES = ("F32", "BF16", "F16")
_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # a recipe's dtype -> safetensors code


class Decline(Exception):
    """This merge is not one the fast path does: the engine does it."""


# -- inputs -----------------------------------------------------------------------------------------
class _Maps:
    """Whole files mapped once, privately (their pages are the page cache's; nothing is written),
    with addresses for the kernels and a way to drop pages once used (resident memory then
    holds about one tensor)."""

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, Any]] = {}

    def _get(self, path: Path) -> tuple[mmap.mmap, Any]:
        got = self._maps.get(path)
        if got is None:
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            got = self._maps[path] = (mm, ctypes.c_char.from_buffer(mm))
        return got

    def addr(self, path: Path, offset: int) -> int:
        return ctypes.addressof(self._get(path)[1]) + offset

    def view(self, path: Path, start: int, end: int) -> memoryview:
        """Bytes [start, end) of a file (no copy)."""
        return memoryview(self._get(path)[0])[start:end]

    def floats(self, path: Path, start: int, end: int) -> memoryview:
        return self.view(path, start, end).cast("f")

    def release(self, path: Path, start: int, end: int) -> None:
        """Drop bytes [start, end) from the map (the page cache keeps them)."""
        self._advise(path, start, end, mmap.MADV_DONTNEED)

    def _advise(self, path: Path, start: int, end: int, advice: int | None) -> None:
        mm = self._maps.get(path)
        if mm is None or end <= start or advice is None:
            return
        lo, hi = start - start % mmap.PAGESIZE, min(len(mm[0]), end + (-end) % mmap.PAGESIZE)
        try:
            mm[0].madvise(advice, lo, hi - lo)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self) -> None:
        maps = list(self._maps.values())
        self._maps.clear()
        while maps:
            mm, view = maps.pop()
            del view  # the last export of the map: it can close
            mm.close()


class _Moments:
    """One expert's moments file as validated (:class:`~ota_trainer.merger.inputs.MomentsLayout`), with
    the scale its values are read with."""

    def __init__(self, layout: MomentsLayout, bias_correction: bool):
        self.path = layout.path
        self.stored = layout.stored
        self.span = layout.span  # validated: float32, in bounds, of the listed shapes
        self.scale = layout.scale(bias_correction)


class _Factors:
    """One expert's second moment of one tensor, prepared as the engine prepares it: rank one,
    ``a = r / row_total(r)`` and ``b = c * scale`` (float64 copies for the saliency, and the
    curvature factors ``P``), or stored whole (``v * scale``, float32)."""

    def __init__(self, maps: _Maps, mom: _Moments, name: str, m: int, n: int, sqrt_p: bool, lib):
        self.keep: list[Any] = []
        s32 = native.float32(mom.scale)
        if mom.stored[name] == "rank1":
            (r0, r1), c0 = mom.span(name + ROW_SUFFIX), mom.span(name + COL_SUFFIX)[0]  # validated: m and n floats
            r = maps.floats(mom.path, r0, r1)
            total = row_total(r)
            self.a64, self.b64 = (ctypes.c_double * m)(), (ctypes.c_double * n)()
            self.pa, self.pb = (ctypes.c_float * m)(), (ctypes.c_float * n)()
            if lib.ota_rank1_prep(maps.addr(mom.path, r0), maps.addr(mom.path, c0), m, n, total, s32, int(mom.scale != 1.0),
                                  int(sqrt_p), self.a64, self.b64, self.pa, self.pb):
                raise Decline(f"{mom.path}: moments of {name!r} hold NaN, Inf or negative values")
            self.kind, self.v = "rank1", None
        else:
            v0, v1 = mom.span(name)
            v = maps.floats(mom.path, v0, v1)
            _check_values(mom.path, name, v, math.fsum(v))
            if mom.scale == 1.0:
                self.v = maps.addr(mom.path, v0)
            elif m * n <= 1 << 20:
                buf = (ctypes.c_float * (m * n))(*[x * s32 for x in v])  # float32 products, as the engine's
                self.keep.append(buf)
                self.v = ctypes.addressof(buf)
            else:
                raise Decline(f"{mom.path}: {name!r}: large full moments to rescale")
            self.kind = "full"

    def score(self, magnitude: bool) -> tuple[int, int | None, int | None, int | None]:
        """(mode, a, b, v) addresses of the FFG saliency."""
        if magnitude:
            return native.S_MAGNITUDE, None, None, None
        if self.kind == "rank1":
            return native.S_RANK1, ctypes.addressof(self.a64), ctypes.addressof(self.b64), None
        return native.S_FULL, None, None, self.v

    def curvature(self) -> tuple[int, int | None, int | None, int | None]:
        """(mode, pa, pb, v) addresses of the OTA curvature."""
        if self.kind == "rank1":
            return native.W_RANK1, ctypes.addressof(self.pa), ctypes.addressof(self.pb), None
        return native.W_FULL, None, None, self.v


def _check_values(path: Path, name: str, x: memoryview, total: float) -> None:
    """Finite and non-negative, or the engine explains (it raises a NumericalError naming them)."""
    if not math.isfinite(total) or (len(x) and min(x) < 0):
        raise Decline(f"{path}: moments of {name!r} hold NaN, Inf or negative values")


# -- the merge --------------------------------------------------------------------------------------
def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Merge:
    def __init__(self, recipe: MergeRecipe, inputs: MergeInputs, quiet: bool):
        self.recipe, self.quiet = recipe, quiet
        self.method = recipe.method
        if self.method not in ("ota", "ties") or inputs.base is None:
            raise Decline(f"method {self.method!r}")
        self.params = recipe.method_parameters()
        self.model_params = [recipe.model_parameters(i) for i in range(len(recipe.models))]
        if not native.available():
            raise Decline("no native kernels")
        self.lib = native.library()
        self.kernel_dtypes = set(_KERNEL_DTYPES) if self.lib.ota_native_has_f16() else {"F32", "BF16"}
        if recipe.dtype and _DTYPE_CODES[recipe.dtype] not in self.kernel_dtypes:
            raise Decline(f"output dtype {recipe.dtype}")
        self.base, self.experts = inputs.base, inputs.experts  # opened and checked (ota_trainer.merger.inputs)
        self._check_dtypes(inputs.float_names)
        self.grafting = recipe.grafting()
        self.threads = _threads()
        self.maps = _Maps()
        self.moments: list[_Moments] = []
        if self.method == "ota":
            self._check_ota(inputs)
        elif len(self.experts) > native.MAX_TIES_EXPERTS:
            raise Decline("too many experts for the TIES kernel")
        self.reports = [
            ExpertReport(m.model, p.get("density") if self.grafting else None, None,
                         saliency_share=p.get("saliency_share") if self.grafting else None, grafted=self.grafting)
            for m, p in zip(recipe.models, self.model_params)
        ]
        self.cuts: list[float | None] = [None] * len(self.experts)  # FFG: None keeps every edit
        self.tensor_density: dict[str, list[float]] = {}

    def _check_dtypes(self, float_names: list[str]) -> None:
        """Every floating tensor of every model in a dtype the kernels read."""
        for name in float_names:
            if any(f.tensors[name].dtype not in self.kernel_dtypes for f in [self.base] + self.experts):
                raise Decline(f"{name!r}: a dtype the kernels do not read")
        self.float_names = float_names

    def _check_ota(self, inputs: MergeInputs) -> None:
        p = self.params
        if p["power"] not in (0.5, 1.0) or p["normalise"] != "none" or p["per_tensor"]:
            raise Decline("power, normalise or per-tensor density the kernels' fast path does not cover")
        if any(mp.get("saliency_share") is not None for mp in self.model_params):
            raise Decline("saliency_share")
        for layout in inputs.moments:
            if layout is None or any(n not in layout.stored for n in self.float_names):
                raise Decline("moments missing for some tensors")
            self.moments.append(_Moments(layout, p["bias_correction"]))
        self.sqrt_p = p["power"] == 0.5

    # pass 1: FFG thresholds -----------------------------------------------------------------------
    def thresholds(self) -> None:
        if not self.grafting:
            return
        for i, p in enumerate(self.model_params):
            if p.get("threshold") is not None:
                value = max(float(p["threshold"]), 0.0)
                self.cuts[i] = value if value > 0 else None
                self.reports[i].threshold_log2 = math.log2(value) if value > 0 else -math.inf
        todo = self.recipe.global_threshold_experts()
        if not todo:
            return
        T = len(todo)  # noqa: N806
        ranges_max = self.threads
        hists = [[mmap.mmap(-1, N_BINS * 8) for _ in range(T)] for _ in range(ranges_max)]  # zero pages until used
        views = [[ctypes.c_char.from_buffer(h) for h in hs] for hs in hists]
        addrs = [[ctypes.addressof(v) for v in vs] for vs in views]
        totals = [0] * T
        magnitude = self.params["score"] == "magnitude"
        try:
            for name in self._progress(self.float_names, "FFG thresholds"):
                w0, m, n, experts = self._tensor(name, [self.experts[i] for i in todo])
                facs = [self._factors(i, name, m, n) for i in todo]
                sc = [f.score(magnitude) for f in facs]
                native.raw_saliency_hist(w0[0], w0[1], m, n, experts, [s[0] for s in sc], [s[1] for s in sc],
                                         [s[2] for s in sc], [s[3] for s in sc], addrs, self.threads)
                for t in range(T):
                    totals[t] += m * n
                self._release(name, [self.base] + [self.experts[i] for i in todo])
                del facs
            for k in range(1, ranges_max):
                for t in range(T):
                    self.lib.ota_add_i64(addrs[0][t], addrs[k][t], N_BINS)
            for t, i in enumerate(todo):
                with memoryview(hists[0][t]) as raw, raw.cast("q") as counts:
                    bins = _nonzero(counts)
                    found = [counts[x] for x in bins]
                b = density_bin(bins, found, totals[t], self.model_params[i]["density"])
                self.cuts[i] = None if b is None else bin_edge(b)
                self.reports[i].threshold_log2 = -math.inf if b is None else math.log2(bin_edge(b))
                kept = totals[t] if b is None else sum(c for x, c in zip(bins, found) if x >= b)
                logger.info("%s: FFG threshold log2(theta)=%.3f keeps %.4f of %d entries (target density %s)",
                            self.experts[i].label, self.reports[i].threshold_log2, kept / max(totals[t], 1), totals[t],
                            self.model_params[i]["density"])
        finally:
            del views
            for hs in hists:
                for h in hs:
                    h.close()

    # pass 2 -----------------------------------------------------------------------------------------
    def run(self, tmp: Path) -> list[str]:
        readahead.start([f.weight_paths + ([m.path] if m else []) for f, m in
                         zip([self.base] + self.experts, [None] + (self.moments or [None] * len(self.experts)))],
                        touch=True)
        self.thresholds()
        plan = [(n, self.base.tensors[n].shape, self._out_dtype(n)) for n in self.base.names]
        writer = StreamingSafetensorsWriter(tmp, plan, max_shard_bytes=parse_size(self.recipe.shard_size),
                                            metadata={"merged_by": f"ota_trainer {__version__}", "merge_method": self.method})
        arena: mmap.mmap | None = None
        arena_view = None
        try:
            for name in self._progress(self.base.names, f"merge ({self.method})"):
                t = self.base.tensors[name]
                dto = self._out_dtype(name)
                nbytes = t.numel * DTYPE_SIZES[dto]
                if t.dtype not in self.kernel_dtypes:  # integer buffers: the base's bytes
                    writer.write_bytes(name, t.shape, dto, self.maps.view(self.base.file(name), t.start, t.end))
                    continue
                if arena is None or len(arena) < nbytes:
                    if arena is not None:
                        del arena_view
                        arena.close()
                    arena = mmap.mmap(-1, max(nbytes, 1))
                    arena_view = ctypes.c_char.from_buffer(arena)
                out = ctypes.addressof(arena_view)
                if self.method == "ota":
                    self._ota(name, out, native.DT_CODES[dto])
                else:
                    self._ties(name, out, native.DT_CODES[dto])
                writer.write_bytes(name, t.shape, dto, memoryview(arena)[:nbytes])
                self._release(name, [self.base] + self.experts)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            arena_view = None
            if arena is not None:
                try:
                    arena.close()
                except BufferError:  # a view of it is still held by an exception's frames: freed with them
                    pass
        return files + copy_side_files(self.base, tmp, self.recipe.dtype)

    def _ota(self, name: str, out: int, dto: int) -> None:
        w0, m, n, experts = self._tensor(name, self.experts)
        facs = [self._factors(i, name, m, n) for i in range(len(self.experts))]
        magnitude = self.params["score"] == "magnitude"
        sc = [f.score(magnitude) if self.cuts[i] is not None else (native.S_NONE, None, None, None) for i, f in enumerate(facs)]
        cv = [f.curvature() for f in facs]
        kept, finite = native.raw_ota_merge(
            w0[0], w0[1], m, n, experts, [s[0] for s in sc], [s[1] for s in sc], [s[2] for s in sc], [s[3] for s in sc],
            [c if c is not None else 0.0 for c in self.cuts], [c[0] for c in cv], [c[1] for c in cv], [c[2] for c in cv],
            [c[3] for c in cv], self.sqrt_p, [0.0] * len(facs), [p["weight"] for p in self.model_params],
            self.params["epsilon"], out, dto, self.threads)
        if not finite:
            raise Decline(f"{name!r}: the merge is not finite (the engine finds the input responsible)")
        if self.grafting:
            numel = m * n
            for i, k in enumerate(kept):
                self.reports[i].kept += k
                self.reports[i].total += numel
            self.tensor_density[name] = [k / max(numel, 1) for k in kept]

    def _ties(self, name: str, out: int, dto: int) -> None:
        w0, m, n, experts = self._tensor(name, self.experts)
        cuts = native.raw_magnitude_cuts(w0[0], w0[1], m * n, experts, [p.get("density") for p in self.model_params], self.threads)
        if not native.raw_ties_merge(w0[0], w0[1], m * n, experts, cuts, [p["weight"] for p in self.model_params],
                                     self.params["lambda"], out, dto, self.threads):
            raise Decline(f"{name!r}: the merge is not finite (the engine finds the input responsible)")

    # helpers ----------------------------------------------------------------------------------------
    def _tensor(self, name: str, folders: list[ModelLayout]):
        for f in [self.base] + folders:  # bytes the read-ahead is about to read: wait for it, do not fault them in
            readahead.wait(f.file(name), f.tensors[name].end)
        t = self.base.tensors[name]
        m, n = matrix_view(t.shape)
        w0 = (self.maps.addr(self.base.file(name), t.start), native.DT_CODES[t.dtype])
        experts = [(self.maps.addr(f.file(name), f.tensors[name].start), native.DT_CODES[f.tensors[name].dtype])
                   for f in folders]
        return w0, m, n, experts

    def _factors(self, i: int, name: str, m: int, n: int) -> _Factors:
        return _Factors(self.maps, self.moments[i], name, m, n, self.sqrt_p, self.lib)

    def _release(self, name: str, folders: list[ModelLayout]) -> None:
        for f in folders:
            t = f.tensors[name]
            self.maps.release(f.file(name), t.start, t.end)

    def _out_dtype(self, name: str) -> str:
        dt = self.base.tensors[name].dtype
        if self.recipe.dtype and dt in self.kernel_dtypes:
            return _DTYPE_CODES[self.recipe.dtype]
        return dt

    def _progress(self, names: list[str], desc: str):
        if self.quiet:
            return names
        from tqdm.auto import tqdm

        return tqdm(names, desc=desc, unit="tensor")


def _nonzero(counts: memoryview) -> list[int]:
    """Indices of the non-zero entries of an int64 view, scanning it as bytes (fast in CPython)."""
    raw = counts.cast("B")
    out: list[int] = []
    step = 1 << 16  # bytes per probe: most of the histogram is empty
    zero = bytes(step)
    for off in range(0, len(raw), step):
        chunk = raw[off : off + step]
        if chunk == zero[: len(chunk)]:
            continue
        base = off // 8
        sub = chunk.cast("q")
        out.extend(base + j for j, c in enumerate(sub) if c)
    return out


def merge(recipe: MergeRecipe, out_dir: str | os.PathLike, *, overwrite: bool = False, quiet: bool = False,
          resolver: Callable[[str], Path] | None = None, output: OutputDir | None = None,
          inputs: MergeInputs | None = None) -> MergeReport | None:
    """Merge as :func:`ota_trainer.merge` does, without PyTorch, when the recipe is one the fast
    path covers; None when it is not (nothing is written then). Raises what the engine raises
    for the output folder and for bad inputs (both open and check them the same way,
    :mod:`ota_trainer.merger.inputs`) before any work. ``output`` and ``inputs``: as in
    :func:`ota_trainer.merger.engine.merge`."""
    start = time.perf_counter()
    if os.environ.get("OTA_TRAINER_FAST_PATH", "1").strip().lower() in ("0", "false", "no", "off"):
        if output is None:  # what a merge would refuse is refused here too
            output_for(recipe, out_dir, overwrite=overwrite, resolver=resolver).release()
        return None
    resolver = resolver or local_resolver
    if output is None:
        with output_for(recipe, out_dir, overwrite=overwrite, resolver=resolver) as output:
            return merge(recipe, out_dir, quiet=quiet, resolver=resolver, output=output, inputs=inputs)
    if inputs is None:
        inputs = open_inputs(recipe, resolver)
    try:
        job = _Merge(recipe, inputs, quiet)
    except Decline as e:
        logger.info("merging with the PyTorch engine (the native fast path does not cover this: %s)", e)
        return None
    try:
        with output.stage() as tmp:
            gc_was_on = gc.isenabled()
            gc.disable()
            try:
                files = job.run(tmp)
            finally:
                if gc_was_on:
                    gc.enable()
            report = finish(tmp, recipe, output.dest, job.reports, job.tensor_density, files, resolver, start)
    except Decline as e:
        logger.info("merging with the PyTorch engine (the native fast path stopped: %s)", e)
        return None
    finally:
        job.maps.close()
    return report
