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
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path


logger = logging.getLogger(__name__)

__all__ = ["available", "why_unavailable", "supports", "SaliencyCounter", "ota_merge", "magnitude_cuts", "ties_merge",
           "MAX_TIES_EXPERTS", "NativeUnavailable", "library", "DT_CODES"]
# the PyTorch-facing wrappers live in .ops (imported on first use: this module loads no PyTorch)
_OPS = ("supports", "SaliencyCounter", "ota_merge", "magnitude_cuts", "ties_merge")

SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread")
MAX_TIES_EXPERTS = 16  # the TIES kernel's stack buffer
# fewer entries than this in a call: one thread (thread hand-off costs more than it saves)
MIN_PARALLEL = 1 << 16

_VERSION = 6  # ota_native_version() of kernels.c
DT_CODES = {"F32": 0, "BF16": 1, "F16": 2}  # safetensors dtype -> the kernels' code
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
    lib.ota_saliency_hist_model.restype = _int
    lib.ota_saliency_hist_model.argtypes = [_int, _int, _ptrs, _ints, _ptrs, _ints, _ptr, _ptr, _ints, _ptrs, _ptrs, _ptrs, _int, _int, _ptrs]
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


def _arr(ctype, values):
    return (ctype * len(values))(*values)


def library() -> ctypes.CDLL:
    """The loaded kernel library (call only after :func:`available` said True)."""
    lib = _load()
    if lib is None:
        raise NativeUnavailable(f"the native kernels are unavailable: {_why}")
    return lib


def __getattr__(name: str):
    if name in _OPS:
        from . import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
