"""FFG's first pass (the saliency histograms) started before PyTorch has loaded.

A merge with a global FFG density reads every expert entry twice: once to find each expert's
threshold, once to merge. Loading PyTorch takes the merge CLI a second or more of CPU; this
module lets the first pass run meanwhile. It needs no PyTorch: recipe (:mod:`.config`),
headers (:mod:`.layout`) and the native kernels (:mod:`.native`, loader only) are enough, and
one kernel call does the whole pass on threads of its own (the GIL is released throughout).

    scan = prescan.start("recipe.yaml")      # before `import torch`: a thread, or None
    ...
    found = prescan.take(base_dir, expert_dirs, score=..., bias_correction=...)   # the engine

The engine takes the histograms only when everything they depend on matches what it would
read itself (folders, score, bias correction, every input file's size and mtime); otherwise,
or when the scan declined (no native kernels, remote models, moments it does not handle, any
error), it counts itself. The counts are the engine's own, bit for bit: same kernel, same
factors (``tests/test_prescan.py``).
"""
from __future__ import annotations

import array
import ctypes
import json
import logging
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import native
from .layout import (
    COL_SUFFIX, METADATA_KEY, ROW_SUFFIX, moments_path, moments_scale, read_safetensors_layout, row_total, weight_files,
)

logger = logging.getLogger(__name__)

__all__ = ["start", "take", "Scan"]

N_BINS = 1 << 21  # ota_trainer.graft.N_BINS (the kernel's bins)
_FLOATS = ("F32", "BF16", "F16")
_lock = threading.Lock()
_scans: list["Scan"] = []


class _Decline(Exception):
    """The scan does not handle this input: the engine counts itself."""


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


def _tensors(folder: Path) -> tuple[dict[str, tuple[str, str, tuple[int, ...], int, int]], list[Path]]:
    """name -> (file, dtype, shape, data start, data end) of a model folder's weights."""
    out: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
    files = weight_files(folder, str(folder))
    for f in files:
        header, start = read_safetensors_layout(folder / f)
        for name, info in header.items():
            if name != "__metadata__":
                b, e = info["data_offsets"]
                out[name] = (f, info["dtype"], tuple(int(d) for d in info["shape"]), start + b, start + e)
    return out, [folder / f for f in files]


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(m, n): the engine's view (first dimension by the rest; 1-D as a column)."""
    if len(shape) >= 2:
        n = 1
        for d in shape[1:]:
            n *= d
        return shape[0], n
    n = 1
    for d in shape:
        n *= d
    return n, 1


class _Files:
    """Read-only views of whole files, and their addresses for the kernels."""

    def __init__(self) -> None:
        self.maps: dict[Path, tuple[mmap.mmap, Any]] = {}

    def addr(self, path: Path, offset: int) -> int:
        if path not in self.maps:
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: pages shared with the cache until written (never)
            self.maps[path] = (mm, ctypes.c_char.from_buffer(mm))
        return ctypes.addressof(self.maps[path][1]) + offset

    def read(self, path: Path, start: int, end: int, dtype: str) -> array.array:
        if dtype != "F32":
            raise _Decline(f"{path}: moments stored as {dtype}")
        self.addr(path, 0)
        out = array.array("f")
        out.frombytes(self.maps[path][0][start:end])
        return out

    def close(self) -> None:
        maps = list(self.maps.values())
        self.maps.clear()
        while maps:
            mm, view = maps.pop()
            del view  # the last reference to the export: the map can close
            mm.close()


def _prepare(base: Path, experts: list[Path], score: str, bias_correction: bool, files: _Files, keep: list):
    """The kernel's arguments for the first pass: every float tensor of the base, in file order."""
    base_t, _ = _tensors(base)
    exp_t = [_tensors(e)[0] for e in experts]
    moments = []
    for e in experts:
        if score == "magnitude":
            moments.append(None)
            continue
        path = moments_path(e)
        header, start = read_safetensors_layout(path)
        meta = json.loads(header["__metadata__"][METADATA_KEY])
        moments.append((path, header, start, meta["parameters"], moments_scale(meta, bias_correction)))
    floats = set(_FLOATS) if native.library().ota_native_has_f16() else {"F32", "BF16"}
    odd = [n for n, t in base_t.items() if t[1] not in floats and t[1].startswith(("F", "BF"))]
    if odd:
        raise _Decline(f"{base}: {odd[0]!r} is {base_t[odd[0]][1]}, which the kernels do not read")
    names = [n for n, t in sorted(base_t.items(), key=lambda kv: (kv[1][0], kv[1][3])) if t[1] in floats]
    T = len(experts)
    w0, dt0, ms, ns = [], [], [], []
    e_ptr, e_dt, smode, sa, sb, sv = [], [], [], [], [], []
    totals = [0] * T
    for name in names:
        f, dt, shape, s0, _ = base_t[name]
        m, n = _matrix(shape)
        w0.append(files.addr(base / f, s0))
        dt0.append(native.DT_CODES[dt])
        ms.append(m)
        ns.append(n)
        for t, (e, et) in enumerate(zip(experts, exp_t)):
            ef, edt, eshape, es0, _ = et[name]  # a mismatch: KeyError, declined (the engine explains it)
            if edt not in floats or eshape != shape:
                raise _Decline(f"{e}: {name!r} differs from the base")
            e_ptr.append(files.addr(e / ef, es0))
            e_dt.append(native.DT_CODES[edt])
            mode, a, b, v = _score(files, moments[t], name, m, n, score)
            keep += [x for x in (a, b, v) if isinstance(x, array.array)]
            smode.append(mode)
            sa.append(_address(a))
            sb.append(_address(b))
            sv.append(_address(v))
            if mode != native.S_NONE:
                totals[t] += m * n
    arr, P, I, L = native._arr, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64  # noqa: N806
    args = (len(names), T, arr(P, w0), arr(I, dt0), arr(P, e_ptr), arr(I, e_dt), arr(L, ms), arr(L, ns), arr(I, smode),
            arr(P, sa), arr(P, sb), arr(P, sv))
    keep += args[2:]
    return args, totals


def _count(scan: Scan, args: tuple, totals: list[int], files: _Files, keep: list) -> None:
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
            raise _Decline("the kernel could not allocate its bins")
        scan.counts, scan.totals = counts, totals
    except Exception as e:  # noqa: BLE001 - the engine reads the inputs itself and reports problems properly
        scan.error = f"{type(e).__name__}: {e}"
    finally:
        keep.clear()
        files.close()


def _address(buf: array.array | int | None) -> int | None:
    return buf if buf is None or isinstance(buf, int) else buf.buffer_info()[0]


def _score(files: _Files, mom, name: str, m: int, n: int, score: str):
    """(mode, a, b, v) of one expert's tensor, as the engine's ``Score`` (float64 rank-one factors
    ``a = r / row_total(r)`` and ``b = c * scale``, or the float32 full ``v * scale``)."""
    if score == "magnitude":
        return native.S_MAGNITUDE, None, None, None
    path, header, start, params, scale = mom
    p = params.get(name)
    if p is None:
        return native.S_NONE, None, None, None  # no moments for it: FFG keeps it whole

    def get(key: str) -> array.array:
        info = header[key]
        b, e = info["data_offsets"]
        return files.read(path, start + b, start + e, info["dtype"])

    s32 = array.array("f", [scale])[0]
    if p["stored"] == "rank1":
        r, c = get(name + ROW_SUFFIX), get(name + COL_SUFFIX)
        if len(r) != m or len(c) != n:
            raise _Decline(f"{path}: factors of {name!r} do not fit")
        if s32 != 1.0:
            c = array.array("f", [x * s32 for x in c])  # float32 products, as the engine's
        total = row_total(r)
        a = array.array("f", [x / total for x in r]) if total > 0 else array.array("f", bytes(4 * m))
        return native.S_RANK1, array.array("d", a), array.array("d", c), None
    info = header[name]
    b, e = info["data_offsets"]
    if info["dtype"] != "F32" or e - b != 4 * m * n:
        raise _Decline(f"{path}: moments of {name!r} are not float32 of its shape")
    if s32 == 1.0:
        return native.S_FULL, None, None, files.addr(path, start + b)  # read in place
    if m * n > 1 << 20:
        raise _Decline(f"{path}: large full moments to rescale")
    return native.S_FULL, None, None, array.array("f", [x * s32 for x in get(name)])


def _key(base: Path, experts: list[Path], score: str, bias_correction: bool) -> tuple:
    paths = [base] + experts
    inputs = []
    for p in paths:
        inputs += [p / f for f in weight_files(p, str(p))]
    if score != "magnitude":
        inputs += [moments_path(e) for e in experts]
    return (str(base.resolve()), tuple(str(e.resolve()) for e in experts), score, bool(bias_correction), _signature(inputs))


def start(recipe) -> Scan | None:
    """Start the first pass of a recipe (a path or a :class:`~ota_trainer.config.MergeRecipe`)
    on a thread, when it has one and its models are local folders; None otherwise (and on any
    problem: the engine reports it)."""
    try:
        from .config import MergeRecipe

        if not isinstance(recipe, MergeRecipe):
            recipe = MergeRecipe.from_yaml(recipe)
        todo = recipe.global_threshold_experts()
        if not todo or not recipe.base_model or not native.available():
            return None
        base = Path(recipe.base_model).expanduser()
        experts = [Path(recipe.models[i].model).expanduser() for i in todo]
        if not base.is_dir() or not all(e.is_dir() for e in experts):
            return None
        p = recipe.method_parameters()
        score, bias = p["score"], p["bias_correction"]
        scan = Scan(_key(base, experts, score, bias))
        files, keep = _Files(), []
        try:  # here, before PyTorch loads: a thread would wait for the GIL behind the import
            args, totals = _prepare(base, experts, score, bias, files, keep)
        except BaseException:
            keep.clear()
            files.close()
            raise
        scan.thread = threading.Thread(target=_count, args=(scan, args, totals, files, keep), name="ota-prescan", daemon=True)
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
