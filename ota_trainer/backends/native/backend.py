"""The native backend: the kernels straight on memory-mapped files, without PyTorch.

Loading PyTorch costs a merge one to three seconds of CPU and disk, about as long as reading a
0.5B-parameter base and two experts. For the recipes whose method has a native implementation
(``MergeMethod.native``) and whose dtypes the kernels read, this backend does the whole merge
with the standard library and the kernels: every input file mapped once (copy-on-write, so
nothing is ever written to it), rank-one factors prepared by a kernel, FFG's histogram pass,
each tensor merged into one reused buffer, its input pages dropped from the maps once merged.
It computes exactly what the PyTorch backend computes: the same kernels on the same factors
and thresholds, so the same bytes (``tests/test_backends.py``).

It also counts FFG's histograms for a merge the PyTorch backend does (:meth:`histograms`:
``covers_histograms``), on a thread of the runner's while PyTorch loads.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
from pathlib import Path
from typing import Any

from ...errors import NumericalError, brief
from ...io import readahead
from ...io.layout import COL_SUFFIX, DTYPE_SIZES, DTYPES, ROW_SUFFIX, dtype_code, matrix_view, row_total
from ..thresholds import N_BINS, Histogram
from . import (
    S_FULL,
    S_MAGNITUDE,
    S_NONE,
    S_RANK1,
    W_FULL,
    W_RANK1,
    available,
    float32,
    library,
    meanwhile,
    raw_saliency_hist,
    why_unavailable,
)

logger = logging.getLogger(__name__)

__all__ = ["NativeBackend", "NativeJob", "Maps", "Factors", "threads"]

_LARGE_FULL = 1 << 20  # full moments this large are read as stored, never rescaled (no copy of that size)


def threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def kernel_dtypes() -> set[str]:
    """The safetensors dtypes the built kernels read and write."""
    lib = library()
    return {c for c, d in DTYPES.items() if d.kernel is not None and (c != "F16" or lib.ota_native_has_f16())}


class Maps:
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
        mm = self._maps.get(path)
        if mm is None or end <= start:
            return
        lo, hi = start - start % mmap.PAGESIZE, min(len(mm[0]), end + (-end) % mmap.PAGESIZE)
        try:
            mm[0].madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self) -> None:
        maps = list(self._maps.values())
        self._maps.clear()
        while maps:
            mm, view = maps.pop()
            del view  # the last export of the map: it can close
            try:
                mm.close()
            except BufferError:  # a view still held by an exception's frames: freed with them
                pass


def _check_values(path: Path, name: str, x: memoryview) -> None:
    """Moments must be finite and non-negative (NumericalError naming the file and tensor)."""
    total = math.fsum(x)
    if not math.isfinite(total):
        raise NumericalError(f"{path}: second moment of {brief(name)} holds NaN or Inf", tensor=name)
    low = min(x) if len(x) else 0.0
    if low < 0:
        raise NumericalError(
            f"{path}: second moment of {brief(name)} holds negative values (min {low:.3g}); Adam's exp_avg_sq is "
            "non-negative, so this file is not a second moment",
            tensor=name,
        )


class Factors:
    """One expert's second moment of one tensor, prepared as the PyTorch backend prepares it:
    rank one, ``a = r / row_total(r)`` and ``b = c * scale`` (float64 copies for the saliency,
    and the curvature factors ``P``, square-rooted when ``sqrt_p``), or stored whole (``v * scale``,
    float32)."""

    def __init__(self, maps: Maps, moments, scale: float, name: str, m: int, n: int, sqrt_p: bool):
        self.keep: list[Any] = []
        s32 = float32(scale)
        if moments.stored[name] == "rank1":
            (r0, r1), (c0, c1) = (
                moments.span(name + ROW_SUFFIX),
                moments.span(name + COL_SUFFIX),
            )  # validated: m, n floats
            r = maps.floats(moments.path, r0, r1)
            self.a64, self.b64 = (ctypes.c_double * m)(), (ctypes.c_double * n)()
            self.pa, self.pb = (ctypes.c_float * m)(), (ctypes.c_float * n)()
            if library().ota_rank1_prep(
                maps.addr(moments.path, r0),
                maps.addr(moments.path, c0),
                m,
                n,
                row_total(r),
                s32,
                int(scale != 1.0),
                int(sqrt_p),
                self.a64,
                self.b64,
                self.pa,
                self.pb,
            ):
                _check_values(moments.path, name, r)  # names which: NaN, Inf or negative
                _check_values(moments.path, name, maps.floats(moments.path, c0, c1))
                raise NumericalError(
                    f"{moments.path}: second moment of {brief(name)} is not finite once bias-corrected (x{scale:.3g})",
                    tensor=name,
                )
            self.kind, self.v = "rank1", None
        else:
            v0, v1 = moments.span(name)
            v = maps.floats(moments.path, v0, v1)
            _check_values(moments.path, name, v)
            if scale == 1.0:
                self.v = maps.addr(moments.path, v0)
            else:  # small (NativeBackend.covers): float32 products, as the PyTorch backend's
                buf = (ctypes.c_float * (m * n))(*[x * s32 for x in v])
                self.keep.append(buf)
                self.v = ctypes.addressof(buf)
            self.kind = "full"

    def score(self, magnitude: bool) -> tuple[int, int | None, int | None, int | None]:
        """(mode, a, b, v) addresses of the FFG saliency."""
        if magnitude:
            return S_MAGNITUDE, None, None, None
        if self.kind == "rank1":
            return S_RANK1, ctypes.addressof(self.a64), ctypes.addressof(self.b64), None
        return S_FULL, None, None, self.v

    def curvature(self) -> tuple[int, int | None, int | None, int | None]:
        """(mode, pa, pb, v) addresses of the OTA curvature."""
        if self.kind == "rank1":
            return W_RANK1, ctypes.addressof(self.pa), ctypes.addressof(self.pb), None
        return W_FULL, None, None, self.v


def _large_rescaled_moments(recipe, moments) -> str | None:
    bias = recipe.method_parameters().get("bias_correction", True)
    for m in moments:
        if (
            m is not None
            and m.scale(bias) != 1.0
            and any(stored == "full" and math.prod(m.shapes[n]) > _LARGE_FULL for n, stored in m.stored.items())
        ):
            return f"{m.path}: large full moments to rescale"
    return None


class NativeBackend:
    """Merges (and counts FFG histograms) with the native kernels alone; one instance per merge."""

    name = "native kernels"

    def __init__(self, recipe, inputs, *, quiet: bool = False):
        self.recipe, self.method, self.quiet = recipe, recipe.spec, quiet
        self.params = recipe.method_parameters()
        self.tensor_params = recipe.per_tensor(inputs.template.names)  # each expert's, per tensor
        self.inputs = inputs
        self.base, self.experts, self.moments = inputs.base, inputs.experts, inputs.moments
        self.scales = [None if m is None else m.scale(self.params.get("bias_correction", True)) for m in self.moments]
        self.grafting = recipe.grafting()
        self.threads = threads()
        self.maps = Maps()
        self.cuts: list[float | None] = [None] * len(self.experts)  # FFG: None keeps every edit
        # FFG thresholds to prove: per expert two more cuts, and the entries kept at them so far
        self.checks: list[tuple[float, float]] | None = None
        self.checked: list[list[int]] = [[0, 0] for _ in self.experts]
        # per expert what the merge pass checks at its two cuts: 0 nothing, 1 the entries kept at
        # them (into checked), 2 the share rule's masses above, between and below them (into masses)
        self.check_modes: list[int] | None = None
        self.masses: list[list[float]] = [[0.0, 0.0, 0.0] for _ in self.experts]
        self._arena: mmap.mmap | None = None
        self._arena_view = None
        self._factors: dict[tuple[int, str], Factors] = {}  # (expert, tensor): this tensor's and the next one's
        # spans of the tensors done, dropped from the maps while the next kernels run
        self._released: list[tuple[Path, int, int]] = []
        self._floats = set(inputs.float_names)

    def set_thresholds(
        self,
        thresholds,
        checks: dict[int, tuple[float, float]] | None = None,
        share_checks: dict[int, tuple[float, float]] | None = None,
    ) -> None:
        """Each expert's FFG threshold (:class:`~ota_trainer.merger.thresholds.Threshold`, None: none),
        ``checks``: {expert: (lo, hi)}, cuts at which the merge pass also counts the entries kept
        (into ``checked[expert]``), and ``share_checks``: {expert: (lo, hi)}, cuts at which it adds
        up the saliency-share rule's masses above, between and below (into ``masses[expert]``); see
        :meth:`checks_thresholds`."""
        self.cuts[:] = [None if t is None or t.keeps_all else t.value for t in thresholds]
        checks, share_checks = checks or {}, share_checks or {}
        if checks or share_checks:
            if not self.checks_thresholds(self.recipe):
                raise ValueError(f"{self.recipe.method}'s native implementation counts no check cuts")
            both = {**checks, **share_checks}
            self.checks = [both.get(i, (0.0, 0.0)) for i in range(len(self.experts))]
            self.check_modes = [2 if i in share_checks else 1 if i in checks else 0 for i in range(len(self.experts))]

    @staticmethod
    def checks_thresholds(recipe) -> bool:
        """Whether this backend's merge pass can count the entries kept at check cuts."""
        return recipe.spec.native_checks

    def start_reads(self) -> None:
        """Read every input into the page cache ahead of the passes, touching each page once."""
        readahead.start(
            [
                f.weight_paths + ([m.path] if m else [])
                for f, m in zip([self.base] + self.experts, [None] + list(self.moments))
            ],
            touch=True,
        )

    # -- what it can do -------------------------------------------------------------------------------
    @staticmethod
    def covers(recipe, inputs) -> str | None:
        """Why the kernels cannot do this merge, or None when they can."""
        method = recipe.spec
        if method.native is None:
            return f"{method.name} has no native implementation"
        reason = NativeBackend._dtypes(recipe, inputs, inputs.experts)
        if reason is None and method.needs_moments:
            reason = _large_rescaled_moments(recipe, inputs.moments)
        return reason if reason is not None else method.native_covers(recipe, inputs) if method.native_covers else None

    @staticmethod
    def covers_histograms(recipe, inputs, experts: list[int]) -> str | None:
        """Why the kernels cannot count FFG's histograms of these experts, or None."""
        reason = NativeBackend._dtypes(recipe, inputs, [inputs.experts[i] for i in experts])
        if reason is None and recipe.method_parameters().get("score") != "magnitude":
            if any(inputs.moments[i] is None for i in experts):
                return "an expert without moments"
            reason = _large_rescaled_moments(recipe, [inputs.moments[i] for i in experts])
        return reason

    @staticmethod
    def _dtypes(recipe, inputs, experts) -> str | None:
        if inputs.base is None:
            return "no base model"
        if os.environ.get("OTA_TRAINER_FAST_PATH", "1").strip().lower() in ("0", "false", "no", "off"):
            return "OTA_TRAINER_FAST_PATH=0"
        if not available():
            return f"no native kernels ({why_unavailable() or 'OTA_TRAINER_NATIVE=0'})"
        ok = kernel_dtypes()
        if recipe.dtype and dtype_code(recipe.dtype) not in ok:
            return f"output dtype {recipe.dtype}"
        for name in inputs.float_names:
            if any(f.tensors[name].dtype not in ok for f in [inputs.base, *experts]):
                return f"{name!r}: a dtype the kernels do not read"
        return None

    # -- FFG's first pass -----------------------------------------------------------------------------
    def histograms(self, experts: list[int], names: list[str]) -> list[Histogram]:
        """Every listed expert's saliencies over ``names`` counted into its histogram (int64 bins in
        anonymous maps: zero pages until counted into), per thread, then added up."""
        T = len(experts)  # noqa: N806
        hists = [[mmap.mmap(-1, N_BINS * 8) for _ in range(T)] for _ in range(self.threads)]
        views = [[ctypes.c_char.from_buffer(h) for h in hs] for hs in hists]
        addrs = [[ctypes.addressof(v) for v in vs] for vs in views]
        totals = [0] * T
        magnitude = self.params.get("score") == "magnitude"
        folders = [self.experts[i] for i in experts]
        lib = library()
        nxt = dict(zip(names, names[1:]))
        try:
            for name in self._progress(names, "FFG thresholds"):
                w0, m, n, tensors = self._tensor(name, folders)
                sc = []
                for k, i in enumerate(experts):
                    if magnitude:
                        sc.append((S_MAGNITUDE, None, None, None))
                    elif self.moments[i] is None or name not in self.moments[i].stored:
                        sc.append((S_NONE, None, None, None))  # no moments for it: FFG keeps it whole
                    else:
                        sc.append(self.factors(i, name, m, n).score(False))
                    if sc[-1][0] != S_NONE:
                        totals[k] += m * n
                with meanwhile(lambda name=name: self._ahead(nxt.get(name), [] if magnitude else experts)):
                    raw_saliency_hist(
                        w0[0],
                        w0[1],
                        m,
                        n,
                        tensors,
                        [s[0] for s in sc],
                        [s[1] for s in sc],
                        [s[2] for s in sc],
                        [s[3] for s in sc],
                        addrs,
                        self.threads,
                    )
                self.release(name, folders)
                self._done(name)
            self._release_now()
            for k in range(1, self.threads):
                for t in range(T):
                    lib.ota_add_i64(addrs[0][t], addrs[k][t], N_BINS)
            out = []
            for t in range(T):
                with memoryview(hists[0][t]) as raw, raw.cast("q") as counts:
                    out.append(Histogram.from_dense(counts, totals[t]))
            return out
        finally:
            del views
            for hs in hists:
                for h in hs:
                    h.close()

    # -- the merge ------------------------------------------------------------------------------------
    def merge_tensor(
        self, name: str, nxt: list[str], out: memoryview | None = None
    ) -> tuple[memoryview, list[int] | None]:
        """Tensor ``name`` merged by its method's native implementation: its bytes in the output
        dtype and, for a grafting method, each mask's kept entries. The kernels write into ``out``
        when given (the writer's staging memory: no copy), else into an arena reused from tensor
        to tensor (the bytes are valid until the next call)."""
        w0, m, n, experts = self._tensor(name, self.experts)
        dto = self.out_dtype(name)
        nbytes = m * n * DTYPE_SIZES[dto]
        if out is not None and nbytes > 0:  # (an empty tensor: the arena, which is never empty)
            if out.nbytes != nbytes or out.readonly:
                raise ValueError(f"{name}: the output buffer must be {nbytes} writable bytes")
            anchor = ctypes.c_char.from_buffer(out)  # keeps `out` exported while the kernels write
            data = out
        else:
            if self._arena is None or len(self._arena) < nbytes:
                self._free_arena()
                self._arena = mmap.mmap(-1, max(nbytes, 1))
                self._arena_view = ctypes.c_char.from_buffer(self._arena)
            anchor, data = self._arena_view, memoryview(self._arena)[:nbytes]
        job = NativeJob(self, name, m, n, w0, experts, ctypes.addressof(anchor), DTYPES[dto].kernel)
        ahead = nxt[0] if nxt and self.method.needs_moments else None
        try:
            with meanwhile(lambda: self._ahead(ahead, range(len(self.experts)))):
                finite = self.method.native(job)
        finally:
            del anchor
            self._done(name)
        if not finite:
            from ..torch import TorchBackend  # PyTorch finds and names the input responsible

            TorchBackend(self.recipe, self.inputs, quiet=True).explain_non_finite(name)
        return data, job.kept

    def raw_bytes(self, name: str) -> memoryview:
        """A tensor copied from the base as stored (integer buffers)."""
        t = self.base.tensors[name]
        return self.maps.view(self.base.file(name), t.start, t.end)

    def release(self, name: str, folders=None) -> None:
        """Drop ``name``'s pages from the maps (they stay in the page cache): while the next
        tensor's kernels run, or at :meth:`close`."""
        for f in [self.base] + list(folders if folders is not None else self.experts):
            t = f.tensors[name]
            self._released.append((f.file(name), t.start, t.end))

    def _release_now(self) -> None:
        for path, start, end in self._released:
            self.maps.release(path, start, end)
        self._released.clear()

    def _ahead(self, name: str | None, experts) -> None:
        """The :func:`meanwhile` work: the pages of tensors done dropped from the maps, and the
        moments of the next tensor ``name`` (None: none) prepared."""
        self._release_now()
        if name is None or name not in self._floats:
            return
        m, n = matrix_view(self.base.tensors[name].shape)
        for i in experts:
            if self.moments[i] is not None and name in self.moments[i].stored:
                self.factors(i, name, m, n)

    def _done(self, name: str) -> None:
        """Forget the prepared moments of tensor ``name``."""
        for key in [k for k in self._factors if k[1] == name]:
            del self._factors[key]

    def out_dtype(self, name: str) -> str:
        dt = self.base.tensors[name].dtype
        return dtype_code(self.recipe.dtype) if self.recipe.dtype and DTYPES[dt].floating else dt

    def close(self) -> None:
        self._released.clear()  # (the maps close whole)
        self._free_arena()
        self.maps.close()

    # -- helpers --------------------------------------------------------------------------------------
    def factors(self, i: int, name: str, m: int, n: int) -> Factors:
        """Expert i's prepared moments of ``name`` (cached until the tensor is done)."""
        key = (i, name)
        if key not in self._factors:
            self._factors[key] = Factors(
                self.maps, self.moments[i], self.scales[i], name, m, n, self.params.get("power") == 0.5
            )
        return self._factors[key]

    def _tensor(self, name: str, folders):
        for f in [self.base] + list(
            folders
        ):  # bytes the read-ahead is about to read: wait for it, do not fault them in
            readahead.wait(f.file(name), f.tensors[name].end)
        t = self.base.tensors[name]
        m, n = matrix_view(t.shape)
        w0 = (self.maps.addr(self.base.file(name), t.start), DTYPES[t.dtype].kernel)
        experts = [
            (self.maps.addr(f.file(name), f.tensors[name].start), DTYPES[f.tensors[name].dtype].kernel) for f in folders
        ]
        return w0, m, n, experts

    def _free_arena(self) -> None:
        self._arena_view = None
        if self._arena is not None:
            try:
                self._arena.close()
            except BufferError:  # a view of it is still held by an exception's frames: freed with them
                pass
            self._arena = None

    def _progress(self, names: list[str], desc: str):
        if self.quiet:
            return names
        from tqdm.auto import tqdm

        return tqdm(names, desc=desc, unit="tensor")


class NativeJob:
    """One tensor as a method's native implementation sees it (see
    :mod:`ota_trainer.merger.methods.base`).

    Attributes:
        name, m, n: the tensor and its (m, n) view.
        w0: the base's ``(address, kernel dtype code)``; ``experts``: the experts'.
        out, out_code: the output buffer's address and kernel dtype code.
        params, model_params, coefs: as in :class:`ota_trainer.backends.torch.TensorJob`.
        cuts: each expert's FFG threshold (None keeps every edit).
        checks, checked: per expert two more cuts (None: none) and the entries kept at them so far
            (``method.native_checks``: the method adds this tensor's).
        check_modes, masses: per expert what it checks at those cuts (None: the kept entries for
            every expert), and the share rule's masses above, between and below them so far.
        threads: kernel threads.
        kept: set by a grafting method: the entries each expert's mask kept.
    """

    def __init__(self, backend: NativeBackend, name: str, m: int, n: int, w0, experts, out: int, out_code: int):
        self._b = backend
        self.name, self.m, self.n, self.w0, self.experts, self.out, self.out_code = (
            name,
            m,
            n,
            w0,
            experts,
            out,
            out_code,
        )
        self.params, self.model_params = backend.params, backend.tensor_params(name)
        self.coefs = [p["weight"] for p in self.model_params]
        self.cuts, self.threads = backend.cuts, backend.threads
        self.checks, self.checked = backend.checks, backend.checked
        self.check_modes, self.masses = backend.check_modes, backend.masses
        self.kept: list[int] | None = None

    def factors(self, i: int) -> Factors:
        """Expert i's prepared moments of this tensor."""
        return self._b.factors(i, self.name, self.m, self.n)
