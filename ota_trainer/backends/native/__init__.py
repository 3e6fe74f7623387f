"""Fused native kernels for the merge's hot loops (FFG histogram, OTA merge, TIES): the one loader
and their raw-address API (no PyTorch). The native backend (:mod:`.backend`) calls them on mapped
files; :mod:`.ops` adapts them to PyTorch tensors for the PyTorch backend.

``kernels.c`` beside this file is compiled on first use with the machine's C compiler
(``$CC``, else ``cc``/``gcc``/``clang``) into a per-user cache and loaded with :mod:`ctypes`,
so the package stays pure Python and nothing is built at install time. The kernels compute
exactly what the PyTorch reference computes (same operations, order and precision, so
the same bits; ``tests/test_native.py``), reading bf16/fp16/fp32 tensors as stored, in one
fused pass per expert entry instead of a dozen tensor-wide ones, on several threads. They are
built for this CPU (``-march=native``; ``-mcpu=native`` on Arm) from portable C with AVX-512
and AVX2 paths where the compiler's own vectorisation falls short, all giving the same bits;
``OTA_TRAINER_MARCH`` builds for another instruction set instead (e.g. ``x86-64-v3``: AVX2).

Control with ``OTA_TRAINER_NATIVE``: unset or ``auto`` uses the kernels when they build and
falls back to PyTorch (with one warning) when they do not; ``0`` never uses them; ``1``
requires them (an error if they cannot be built). The cache folder is
``$OTA_TRAINER_CACHE/kernels`` (default ``~/.cache/ota_trainer/kernels``), created owner-only.
A library there is loaded only from a folder nobody else can write to, only if it is a file of
ours and only if its bytes match the sha256 its build recorded beside it: otherwise the kernels
are refused (the PyTorch path is used, with one warning saying how to fix it), never rebuilt over.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...io.cache import cache_root, open_private, private_folder, write_private
from ...io.layout import DTYPES

logger = logging.getLogger(__name__)

__all__ = ["available", "why_unavailable", "MAX_TIES_EXPERTS", "NativeUnavailable", "library", "DT_CODES"]

SOURCE = Path(__file__).with_name("kernels.c")
# the target flag (-march=native, or -mcpu=native on Arm; see _target_flags) comes before these
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
# x86: use 512-bit vectors where the target has them. gcc's tuning for recent Intel cores
# (icelake, sapphirerapids) keeps 256-bit vectors by default; with 512 the merge loop took 20%
# less time (merge pass 1.04-1.08 s vs 1.30-1.34 s, 0.5B ota, two threads, warm cache, Xeon with
# AVX-512, 2026-12-02) with the same bits (every lane computes its own entry; no float reduction
# crosses lanes). Without AVX-512 the flag changes nothing.
_X86_WIDTH = ("-mprefer-vector-width=512",)
# OTA_TRAINER_MARCH: the instruction set to build for instead of this CPU's (e.g. x86-64-v3: AVX2)
MARCH_ENV = "OTA_TRAINER_MARCH"
_MARCH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")
MAX_TIES_EXPERTS = 16  # the TIES kernel's stack buffer
# fewer entries than this in a call: one thread (thread hand-off costs more than it saves)
MIN_PARALLEL = 1 << 16

_VERSION = 10  # ota_native_version() of kernels.c
# in the library's cache key: libraries built before checksums were recorded get another name (not refused)
_CACHE_FORMAT = b"sha256-v1"
_CACHE_NAME, _CACHE_WHAT = "kernels", "kernel cache"  # its folder under the cache root; its name in errors
DT_CODES = {c: d.kernel for c, d in DTYPES.items() if d.kernel is not None}  # safetensors dtype -> the kernels' code
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
_pool: ThreadPoolExecutor | None = None
_warned = False


def _mode() -> str:
    mode = os.environ.get("OTA_TRAINER_NATIVE", "auto").strip().lower()
    return {"": "auto", "true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}.get(mode, mode)


def _compiler() -> str | None:
    for cc in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(cc)
        if path:
            return path
    return None


def _arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def _width() -> tuple[str, ...]:
    """The vector-width preference (x86 only: other compilers' targets do not know the flag)."""
    return _X86_WIDTH if platform.machine().lower() in ("x86_64", "amd64") else ()


def _target_flags() -> tuple[str, ...]:
    """The compiler's target: ``-march=native`` (``-mcpu=native`` on 64-bit Arm, where gcc does not
    take ``-march=native`` everywhere), or ``-march=$OTA_TRAINER_MARCH`` when that is set (e.g.
    ``x86-64-v3`` for AVX2 only, ``x86-64`` for the baseline; ``native`` is the default)."""
    value = os.environ.get(MARCH_ENV, "").strip()
    if value in ("", "native"):
        return ("-mcpu=native",) if _arm() else ("-march=native", *_width())
    if len(value) > 64 or not set(value) <= _MARCH_CHARS:
        raise OSError(
            f"{MARCH_ENV}={value!r} is not a target name (letters, digits, '-', '.' and '_' only, "
            "e.g. native, x86-64-v3, armv8.2-a)"
        )
    return (f"-march={value}", *_width())


def _cpu_signature() -> str:
    """What the library's build depends on besides its source, compiler and flags: the CPU
    (-march=native, -mcpu=native), so a library built for one CPU is not loaded on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name", "CPU implementer", "CPU part", "CPU variant")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _cache_dir() -> Path:
    return cache_root() / _CACHE_NAME


def _open_library(path: Path) -> int:
    return open_private(path, "kernel library file", "delete it (it is rebuilt)")


def _sidecar(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Serialise builds into one folder (one per rank of a launch): each writes the checksum and
    then the library, so two at once could pair one's checksum with the other's library."""
    try:
        import fcntl
    except ImportError:  # not POSIX: unserialised (compilers give the same bytes for the same input)
        yield
        return
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(cc: str) -> Path:
    """Compile ``kernels.c`` into the cache (once per source, compiler, target flags and CPU);
    returns the library.

    The cache folders are created owner-only and checked (:func:`~ota_trainer.io.cache.check_folder`); the library
    is compiled beside its final name and renamed into place (concurrent builds are safe) after
    its sha256 is written to ``<name>.sha256``, which :func:`_open_verified` checks before
    loading it. A library in place is never rebuilt over: if it is not ours, it is refused."""
    src = SOURCE.read_bytes()
    flags = (*_target_flags(), *CFLAGS)
    key = hashlib.sha256(
        src + cc.encode() + " ".join(flags).encode() + _cpu_signature().encode() + _CACHE_FORMAT
    ).hexdigest()[:16]
    folder = private_folder(_CACHE_NAME, _CACHE_WHAT)
    out = folder / f"ota_kernels-{key}.so"
    if os.path.lexists(out):
        return out
    with _build_lock(folder):
        if os.path.lexists(out):  # built while we waited
            return out
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # compile beside it, rename
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise OSError(f"{cc} failed: {(r.stderr or r.stdout).strip()[-500:]}")
            os.chmod(tmp, 0o700)  # the linker made it with the umask's bits
            write_private(_sidecar(out), hashlib.sha256(Path(tmp).read_bytes()).hexdigest().encode())
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def _open_verified(path: Path) -> ctypes.CDLL:
    """Load the library only if it is a file of ours whose bytes hash to the sha256 its build
    recorded (a missing record counts as a mismatch). The bytes hashed are the bytes loaded: one
    descriptor is hashed and then loaded through ``/proc/self/fd`` (the path elsewhere)."""
    fd = _open_library(path)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        try:
            sfd = _open_library(_sidecar(path))
        except FileNotFoundError:
            raise OSError(
                f"refusing the kernel library {path}: it has no checksum {_sidecar(path).name} "
                "(not built by ota_trainer?); delete it (it is rebuilt)"
            ) from None
        with os.fdopen(sfd, "rb") as f:
            want = f.read(256).strip().decode("ascii", "replace")
        if h.hexdigest() != want:
            raise OSError(
                f"refusing the kernel library {path}: its sha256 does not match the one its build recorded "
                f"in {_sidecar(path).name} (changed since?); delete both (they are rebuilt)"
            )
        proc = f"/proc/self/fd/{fd}"
        return ctypes.CDLL(proc if sys.platform.startswith("linux") and os.path.exists(proc) else str(path))
    finally:
        os.close(fd)


def _declare(lib: ctypes.CDLL) -> None:
    lib.ota_native_version.restype = _int
    lib.ota_native_has_f16.restype = _int
    lib.ota_saliency_hist.restype = None
    lib.ota_saliency_hist.argtypes = [
        _ptr,
        _int,
        _int,
        _ptrs,
        _ints,
        _i64,
        _i64,
        _i64,
        _ints,
        _ptrs,
        _ptrs,
        _ptrs,
        _ptrs,
    ]
    lib.ota_abs_hist.restype = None
    lib.ota_abs_hist.argtypes = [_ptr, _int, _int, _ptrs, _ints, _i64, _i64, _ptr, _ptrs]
    lib.ota_abs_sample.restype = None
    lib.ota_abs_sample.argtypes = [_ptr, _int, _int, _ptrs, _ints, _i64, _i64, _i64, _ptrs]
    lib.ota_abs_bracket.restype = _i64
    lib.ota_abs_bracket.argtypes = [
        _ptr,
        _int,
        _ptr,
        _int,
        _i64,
        _i64,
        ctypes.c_uint32,
        ctypes.c_uint32,
        _ptr,
        _ptr,
        _i64,
    ]
    lib.ota_select_bits.restype = ctypes.c_uint32
    lib.ota_select_bits.argtypes = [_ptr, _i64, _i64]
    lib.ota_ties.restype = _int
    lib.ota_ties.argtypes = [_ptr, _int, _int, _ptrs, _ints, _i64, _i64, _ptr, _ptr, _f32, _ptr, _int]
    lib.ota_rank1_prep.restype = _int
    lib.ota_rank1_prep.argtypes = [_ptr, _ptr, _i64, _i64, _f32, _f32, _int, _int, _ptr, _ptr, _ptr, _ptr]
    lib.ota_add_i64.restype = None
    lib.ota_add_i64.argtypes = [_ptr, _ptr, _i64]
    lib.ota_select_from_top.restype = _i64
    lib.ota_select_from_top.argtypes = [_ptr, _i64, _i64, _ptr]
    lib.ota_merge_rows.restype = _int
    lib.ota_merge_rows.argtypes = [
        _ptr,
        _int,
        _int,
        _ptrs,
        _ints,
        _i64,
        _i64,
        _i64,  # w0, dt0, T, e, dte, n, r0, r1
        _ints,
        _ptrs,
        _ptrs,
        _ptrs,
        _ptr,  # smode, sa, sb, sv, cut
        _ints,
        _ptrs,
        _ptrs,
        _ptrs,
        _int,
        _ptr,  # wmode, pa, pb, wv, sqrt_p, pdiv
        _f32,
        _f32,
        _ptr,
        _ptr,
        _int,
        _ptr,  # eps, uniform, coef, out, dto, kept
        _ptr,
        _ptr,  # chk, chkd
        _ints,
        _ptr,  # mode, mass
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
            lib = _open_verified(_build(cc))
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


def _expert_arrays(experts: list[tuple[int, int]]):
    """The experts' (address, dtype code) pairs as the two C arrays the kernels take."""
    return _arr(_ptr, [e for e, _ in experts]), _arr(_int, [d for _, d in experts])


def library() -> ctypes.CDLL:
    """The loaded kernel library (call only after :func:`available` said True)."""
    lib = _load()
    if lib is None:
        raise NativeUnavailable(f"the native kernels are unavailable: {_why}")
    return lib


# -- the kernels on raw addresses (no PyTorch): .ops adapts tensors, .backend maps files ----------------
def float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (as a Python float)."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def workers(rows: int, numel: int, threads: int) -> list[tuple[int, int]]:
    """Contiguous ranges of ``rows`` rows (or elements: ``rows = numel``), one per thread; one
    range for small tensors (a hand-off to threads costs more than it saves)."""
    if rows <= 0:  # an empty tensor: nothing to do
        return []
    k = max(1, min(threads, rows, numel // MIN_PARALLEL if numel >= 2 * MIN_PARALLEL else 1))
    step = -(-rows // k)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


_ahead = threading.local()  # .work: what this thread does while its next kernels run (see meanwhile)


@contextlib.contextmanager
def meanwhile(work):
    """Run ``work()`` (no arguments) on this thread while the block's first kernels run on the
    pool, or at the end of the block if none ran there: a caller prepares its next tensor while
    the kernels merge this one (the kernels release the GIL; the calling thread would only wait)."""
    _ahead.work = work
    try:
        yield
    except BaseException:
        _ahead.work = None  # (the block's error is the one to report: the work is dropped)
        raise
    pending, _ahead.work = getattr(_ahead, "work", None), None
    if pending is not None:
        pending()


def run(calls: list, threads: int) -> list:
    """Run zero-argument callables on the thread pool (ctypes releases the GIL) and return their
    results; the calling thread does the :func:`meanwhile` work in the meantime."""
    global _pool
    if len(calls) == 1:
        return [calls[0]()]
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(2, threads), thread_name_prefix="ota-native")
    futures = [_pool.submit(c) for c in calls]
    work, _ahead.work = getattr(_ahead, "work", None), None
    try:
        if work is not None:
            work()
    finally:  # (the kernels use memory their caller frees: never leave before they are done)
        results = [f.result() for f in futures]
    return results


def raw_saliency_hist(
    w0: int,
    dt0: int,
    m: int,
    n: int,
    experts: list[tuple[int, int]],
    smode: list[int],
    sa: list,
    sb: list,
    sv: list,
    hists: list[list[int]],
    threads: int,
) -> None:
    """Count rows of one (m, n) tensor into per-range histograms: range k of
    ``workers(m, m * n, threads)`` counts into ``hists[k]`` (T int64[2^21] addresses)."""
    lib = library()
    T = len(experts)
    eptr, edt = _expert_arrays(experts)
    sm, pa, pb, pv = _arr(_int, smode), _arr(_ptr, sa), _arr(_ptr, sb), _arr(_ptr, sv)
    ranges = workers(m, m * n, threads)
    hp = [_arr(_ptr, hists[k]) for k in range(len(ranges))]
    run(
        [
            lambda k=k, r0=r0, r1=r1: lib.ota_saliency_hist(w0, dt0, T, eptr, edt, n, r0, r1, sm, pa, pb, pv, hp[k])
            for k, (r0, r1) in enumerate(ranges)
        ],
        threads,
    )


def raw_ota_merge(
    w0: int,
    dt0: int,
    m: int,
    n: int,
    experts: list[tuple[int, int]],
    smode: list[int],
    sa: list,
    sb: list,
    sv: list,
    cuts: list[float],
    wmode: list[int],
    pa: list,
    pb: list,
    wv: list,
    sqrt_p: bool,
    pdiv: list[float],
    coefs: list[float],
    epsilon: float,
    out: int,
    dto: int,
    threads: int,
    checks: list[tuple[float, float]] | None = None,
    checked: list[list[int]] | None = None,
    modes: list[int] | None = None,
    masses: list[list[float]] | None = None,
) -> tuple[list[int], bool]:
    """OTA (+ FFG masks) of one (m, n) tensor into ``out`` (see ``ota_merge_rows`` in kernels.c).
    Returns (entries kept per expert, whether every merged value is finite).

    ``checks``: per expert two more cuts (lo, hi); the entries each keeps (of the experts with a
    score) are added to ``checked[t][0]``, ``checked[t][1]`` (if given). With ``modes``, only the experts
    whose mode is 1 count those; those whose mode is 2 add the saliency masses at or above hi, in
    [lo, hi) and below lo (the share rule's, see kernels.c) to ``masses[t]``; 0 checks nothing."""
    lib = library()
    T = len(experts)
    chk = _arr(_f64, [c for pair in checks for c in pair]) if checks is not None else None
    eptr, edt = _expert_arrays(experts)
    sm, a, b, v = _arr(_int, smode), _arr(_ptr, sa), _arr(_ptr, sb), _arr(_ptr, sv)
    wm, qa, qb, qv = _arr(_int, wmode), _arr(_ptr, pa), _arr(_ptr, pb), _arr(_ptr, wv)
    cut, div, coef = _arr(_f64, cuts), _arr(_f32, pdiv), _arr(_f32, coefs)
    eps32, uniform = float32(epsilon), float32(1.0 + epsilon)
    ranges = workers(m, m * n, threads)
    kept = [_arr(_i64, [0] * T) for _ in ranges]
    chkd = [_arr(_i64, [0] * (2 * T)) for _ in ranges] if chk is not None else [None] * len(ranges)
    mode = _arr(_int, modes) if chk is not None and modes is not None else None
    mass = [_arr(_f64, [0.0] * (3 * T)) for _ in ranges] if mode is not None else [None] * len(ranges)
    bad = run(
        [
            lambda k=k, r0=r0, r1=r1: lib.ota_merge_rows(
                w0,
                dt0,
                T,
                eptr,
                edt,
                n,
                r0,
                r1,
                sm,
                a,
                b,
                v,
                ctypes.addressof(cut),
                wm,
                qa,
                qb,
                qv,
                int(sqrt_p),
                ctypes.addressof(div),
                eps32,
                uniform,
                ctypes.addressof(coef),
                out,
                dto,
                ctypes.addressof(kept[k]),
                ctypes.addressof(chk) if chk is not None else None,
                ctypes.addressof(chkd[k]) if chk is not None else None,
                mode,
                ctypes.addressof(mass[k]) if mode is not None else None,
            )
            for k, (r0, r1) in enumerate(ranges)
        ],
        threads,
    )
    if chk is not None and checked is not None:
        for part in chkd:
            for t in range(T):
                checked[t][0] += int(part[2 * t])
                checked[t][1] += int(part[2 * t + 1])
    if mode is not None:
        for part in mass:  # (a few partial sums per tensor: their rounding is in share_proved's bound)
            for t in range(T):
                for j in range(3):
                    masses[t][j] += part[3 * t + j]
    return [sum(int(kk[t]) for kk in kept) for t in range(T)], not any(bad)


def raw_magnitude_cuts(
    w0: int, dt0: int, numel: int, experts: list[tuple[int, int]], densities: list[float], threads: int
) -> list[float]:
    """Each task vector's TIES trim threshold over the whole tensor (``-inf`` keeps all, ``inf``
    none): the ``round(density * numel)``-th largest ``|e - w0|``, by a two-level radix select
    (:func:`ota_trainer.backends.torch.ops.magnitude_cut`, exactly)."""
    lib = library()
    T = len(experts)
    eptr, edt = _expert_arrays(experts)
    cuts: list[float | None] = []
    ks = []
    for p in densities:
        k = int(round(p * numel))
        ks.append(k)
        cuts.append(-math.inf if k >= numel else math.inf if k <= 0 else None)
    todo = [t for t, c in enumerate(cuts) if c is None]
    if not todo:
        return cuts
    ranges = workers(numel, numel, threads)

    def count(bins: int, bucket) -> list:
        parts = [[(_i64 * bins)() for _ in range(T)] for _ in ranges]
        hps = [_arr(_ptr, [ctypes.addressof(h) for h in hs]) for hs in parts]
        run(
            [
                lambda r0=r0, r1=r1, hp=hp: lib.ota_abs_hist(w0, dt0, T, eptr, edt, r0, r1, bucket, hp)
                for (r0, r1), hp in zip(ranges, hps)
            ],
            threads,
        )
        for p in parts[1:]:
            for t in range(T):
                lib.ota_add_i64(ctypes.addressof(parts[0][t]), ctypes.addressof(p[t]), bins)
        return parts[0]

    def select(h, k: int) -> tuple[int, int]:
        rank = _i64(0)
        b = lib.ota_select_from_top(ctypes.addressof(h), len(h), k, ctypes.byref(rank))
        return int(b), int(rank.value)

    todo = _bracketed_cuts(lib, w0, dt0, numel, experts, ks, cuts, todo, ranges, threads, select)
    if todo:  # the exact two full passes: top 16 bits of every |d|, then the low 16 inside the bucket
        hi = count(1 << 15, None)
        picks = {t: select(hi[t], ks[t]) for t in todo}
        buckets = _arr(_i64, [picks[t][0] if t in picks else -1 for t in range(T)])
        lo = count(1 << 16, ctypes.addressof(buckets))
        for t in todo:
            bucket, rank = picks[t]
            low, _ = select(lo[t], rank)
            cuts[t] = _f32_of_bits((bucket << 16) | low)
    return cuts


# TIES cuts of tensors this large first try one pass over a bracket a sample found (see
# ota_abs_bracket in kernels.c) instead of two: 4 sigma of the sample's rank error either side,
# so the bracket misses (and the two passes run) about once in 30000 tensors. Exact either way.
BRACKET_MIN = 1 << 18
BRACKET_STRIDE = 8 * 61  # 8 neighbouring entries every 488 (61: a prime, not aligned with rows)
BRACKET_MAX_SHARE = 0.25  # of the entries inside the bracket (bf16 edits take few distinct values)


def _f32_of_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _bracketed_cuts(lib, w0, dt0, numel, experts, ks, cuts, todo, ranges, threads, select) -> list[int]:
    """Fill ``cuts[t]`` for the experts whose k-th largest ``|d|`` a sample brackets (one pass
    over the tensor, the candidates in the bracket selected exactly); returns the experts left
    for the two-pass select."""
    if numel < BRACKET_MIN or not todo:
        return todo
    T = len(experts)  # noqa: N806
    eptr, edt = _expert_arrays(experts)
    sample = [(_i64 * (1 << 15))() for _ in range(T)]
    lib.ota_abs_sample(
        w0, dt0, T, eptr, edt, 0, numel, BRACKET_STRIDE, _arr(_ptr, [ctypes.addressof(h) for h in sample])
    )
    full, rest = divmod(numel, BRACKET_STRIDE)
    ns = 8 * full + min(8, rest)  # entries sampled
    jobs, plans, left = [], {}, []
    for t in todo:
        q = ks[t] / numel
        expect = q * ns
        margin = 4.0 * math.sqrt(max(expect * (1.0 - q), 1.0)) + 4.0
        hi = select(sample[t], max(1, int(expect - margin)))[0]
        lo = select(sample[t], min(ns, int(math.ceil(expect + margin))))[0]
        share = sum(sample[t][b] for b in range(lo, hi + 1)) / ns
        if share > BRACKET_MAX_SHARE:  # too many candidates to copy: the two passes
            left.append(t)
            continue
        caps = [int((r1 - r0) * min(1.0, 2.0 * share + 1e-3)) + 4096 for r0, r1 in ranges]
        buf = (ctypes.c_uint32 * sum(caps))()
        above = (_i64 * len(ranges))()
        plans[t] = (lo, hi, buf, above, caps, [])
        off = 0
        for k, ((r0, r1), cap) in enumerate(zip(ranges, caps)):
            jobs.append((t, k, r0, r1, off, cap))
            off += cap
    e_of = [experts[t] for t in range(T)]

    def job(t, k, r0, r1, off, cap):
        lo, hi, buf, above, _, _ = plans[t]
        return lib.ota_abs_bracket(
            w0,
            dt0,
            e_of[t][0],
            e_of[t][1],
            r0,
            r1,
            lo,
            hi,
            ctypes.addressof(above) + 8 * k,
            ctypes.addressof(buf) + 4 * off,
            cap,
        )

    found = run([lambda j=j: job(*j) for j in jobs], threads)
    for (t, _k, _r0, _r1, off, _cap), nc in zip(jobs, found):
        plans[t][5].append((off, nc))
    chosen = []  # (expert, candidates, rank among them)
    for t, (_lo, _hi, buf, above, _caps, got) in plans.items():
        if any(nc < 0 for _, nc in got):
            left.append(t)
            continue
        n_above, at = sum(above), 0
        for off, nc in got:  # the ranges' candidates, contiguous
            if off != at:
                ctypes.memmove(ctypes.addressof(buf) + 4 * at, ctypes.addressof(buf) + 4 * off, 4 * nc)
            at += nc
        if n_above < ks[t] <= n_above + at:
            chosen.append((t, buf, at, ks[t] - n_above))
        else:
            left.append(t)
    bits = run([lambda c=c: lib.ota_select_bits(c[1], c[2], c[3]) for c in chosen], threads) if chosen else []
    for (t, _, _, _), b in zip(chosen, bits):
        cuts[t] = _f32_of_bits(b)
    return sorted(left)


def raw_ties_merge(
    w0: int,
    dt0: int,
    numel: int,
    experts: list[tuple[int, int]],
    cuts: list[float],
    coefs: list[float],
    lam: float,
    out: int,
    dto: int,
    threads: int,
) -> bool:
    """TIES of one tensor into ``out`` (see ``ota_ties`` in kernels.c); whether it is finite."""
    if len(experts) > MAX_TIES_EXPERTS:
        raise ValueError(f"native TIES merges at most {MAX_TIES_EXPERTS} experts")
    lib = library()
    eptr, edt = _expert_arrays(experts)
    cut, coef, lam32 = _arr(_f32, cuts), _arr(_f32, coefs), float32(lam)
    bad = run(
        [
            lambda r0=r0, r1=r1: lib.ota_ties(
                w0, dt0, len(experts), eptr, edt, r0, r1, ctypes.addressof(cut), ctypes.addressof(coef), lam32, out, dto
            )
            for r0, r1 in workers(numel, numel, threads)
        ],
        threads,
    )
    return not any(bad)
