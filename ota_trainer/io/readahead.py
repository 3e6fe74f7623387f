"""Read the merge's inputs into the page cache ahead of the engine, in the order it reads them.

Standard library only, so that ``scripts/merge_from_hub.py`` can start it before importing
PyTorch (the disk then works while the interpreter starts). The engine starts it too.

Models share one tensor layout, and the engine reads tensor ``k`` of every model before
tensor ``k + 1``, so the files are asked for in interleaved slices: slice 0 of every model,
then slice 1, ... (``posix_fadvise(WILLNEED)``: the kernel reads asynchronously; the call
waits only when the disk queue is full, which paces this thread at the disk's speed). Only a
hint: errors are ignored, and platforms without ``posix_fadvise`` do nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["model_files", "readahead", "start", "wait", "local_models_in_args"]

SLICE_BYTES = 32 * 2**20


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files a merge reads from a local model folder: weights, then second moments."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    moments = folder / "ota" / "moments.safetensors"
    return files + ([moments] if moments.is_file() else [])


def readahead(
    groups: Sequence[Sequence[str | os.PathLike]], slice_bytes: int = SLICE_BYTES, *, touch: bool = False
) -> None:
    """Ask for every file of every group, slice ``k`` of each group before slice ``k + 1``.

    A group is one model's files, read as one concatenated stream. With ``touch`` every page of
    the slices is also faulted in once (see :func:`_toucher`): that waits for the disk and
    costs CPU, but the engine's first pass over the pages is then fast on virtual machines that
    back guest memory lazily. Meant for a core that is otherwise idle (while the interpreter
    starts); the thread lowers its own CPU priority."""
    if not hasattr(os, "posix_fadvise"):
        return
    touch_fn = _toucher() if touch else None
    if touch and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:  # Linux: priorities are per thread; the interpreter's own start-up goes first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass
    streams = []
    for files in groups:
        spans = []
        for f in files:
            try:  # non-blocking, regular files only: a FIFO named like a weight file must not stall the merge
                fd = os.open(f, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            except OSError:
                continue
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                continue
            spans.append([fd, 0, st.st_size, _real(f)])
        streams.append(spans)
    try:
        active = True
        while active:
            active = False
            for spans in streams:
                budget = slice_bytes
                while spans and budget > 0:
                    span = spans[0]
                    fd, pos, size, real = span
                    n = min(budget, size - pos)
                    if n > 0:  # (a length of 0 would mean "to the end of the file")
                        try:
                            os.posix_fadvise(fd, pos, n, os.POSIX_FADV_WILLNEED)
                            if touch_fn is not None:
                                touch_fn(fd, pos, n)
                        except OSError:
                            pass
                    span[1] += n
                    budget -= n
                    _advance(real, span[1] if span[1] < size else _DONE)
                    if span[1] >= size:
                        os.close(fd)
                        spans.pop(0)
                active = active or bool(spans)
    finally:
        for spans in streams:
            for fd, _, _, real in spans:
                os.close(fd)
                _advance(real, _DONE)  # (an error: nobody waits for these bytes any more)


# How far the running read-ahead has read each file (realpath -> bytes), for :func:`wait`.
_DONE = float("inf")
_progress: dict[str, float] = {}
_progress_changed = threading.Condition()


def _advance(real: str, upto: float) -> None:
    with _progress_changed:
        _progress[real] = upto
        _progress_changed.notify_all()


def wait(path: str | os.PathLike, end: int, timeout: float = 60.0) -> None:
    """Wait until the read-ahead has read ``path`` up to byte ``end`` (at once when no read-ahead
    of this process reads that file, or it is past it). A reader that waits instead of faulting
    the pages in itself does not send the disk a second stream of requests competing with the
    read-ahead's (measured: that made both slower)."""
    with _progress_changed:
        if not _pending:
            return
        real = _real(path)
        if real not in _pending:
            return
        _progress_changed.wait_for(lambda: _progress.get(real, 0) >= end, timeout=timeout)


_realpaths: dict[str, str] = {}


def _real(path: str | os.PathLike) -> str:
    """``os.path.realpath``, remembered: :func:`wait` is asked about the same few files once per
    tensor and input (resolving each time took ~0.2 s of a 0.5B merge). Every key of the
    read-ahead's bookkeeping comes from here, so :func:`start`, the reader and :func:`wait` agree."""
    key = os.fspath(path)
    real = _realpaths.get(key)
    if real is None:
        real = _realpaths[key] = os.path.realpath(key)
    return real


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def _toucher():
    """A function ``(fd, pos, n)`` that waits for those bytes and touches every page once:
    ``madvise(MADV_POPULATE_READ)`` on a temporary map (Linux 5.14+, no copy), called through
    ctypes so the interpreter's other threads run meanwhile (``mmap.madvise`` holds the GIL
    while it waits for the disk); else reads into a reused buffer (``preadv`` releases the GIL)."""
    buf = None
    madvise = _libc_madvise()

    def populate(fd: int, pos: int, n: int) -> None:
        nonlocal buf
        if buf is None and madvise is not None:
            lo = pos - pos % mmap.ALLOCATIONGRANULARITY
            try:
                with mmap.mmap(fd, pos + n - lo, access=mmap.ACCESS_COPY, offset=lo) as mm:
                    view = ctypes.c_char.from_buffer(mm)
                    try:
                        ok = madvise(ctypes.addressof(view), len(mm), _MADV_POPULATE_READ) == 0
                    finally:
                        del view
                if ok:
                    return
            except (OSError, ValueError, TypeError):
                pass
        if buf is None:
            buf = memoryview(bytearray(SLICE_BYTES))  # no MADV_POPULATE_READ here: read instead
        for off in range(pos, pos + n, len(buf)):
            os.preadv(fd, [buf[: min(len(buf), pos + n - off)]], off)

    return populate


def _libc_madvise():
    """libc's ``madvise(addr, length, advice)`` through ctypes (the GIL is released), or None."""
    if _MADV_POPULATE_READ is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_started: set[str] = set()
_pending: set[str] = set()  # files a touching read-ahead reads (wait() waits for them)
_started_lock = threading.Lock()


def start(groups: Sequence[Sequence[str | os.PathLike]], *, touch: bool = False) -> threading.Thread | None:
    """:func:`readahead` on a daemon thread (its system calls release the GIL), for the files no
    earlier call in this process asked for: the merge CLI starts it first thing, and the engine
    or the fast path asking again for the same inputs adds nothing (None when nothing is new)."""
    with _started_lock:
        fresh = []
        for files in groups:
            new = [f for f in files if _real(f) not in _started]
            _started.update(_real(f) for f in new)
            if new:
                fresh.append(new)
    if not fresh:
        return None
    if touch:  # only then do its bytes stand for pages read: wait() waits for those
        with _progress_changed:
            _pending.update(_real(f) for files in fresh for f in files)
    t = threading.Thread(target=readahead, args=(fresh,), kwargs={"touch": touch}, name="ota-readahead", daemon=True)
    t.start()
    return t


def local_models_in_args(argv: Sequence[str]) -> list[Path]:
    """The local model folders a merge command line names (``--base``, ``--expert A B ...`` and
    the recipe's ``base_model`` and ``models``, the recipe given as ``--recipe`` or as the first
    positional), for a read-ahead before the command parses them properly. Anything unreadable is
    skipped: the real parser reports it."""
    refs: list[str] = []

    def recipe_models(value: str) -> list[str]:
        try:
            from .layout import read_yaml  # light: bounded, regular files only

            recipe = read_yaml(Path(value))
            models = [str(recipe.get("base_model") or "")]
            return models + [str(m.get("model") if isinstance(m, dict) else m) for m in recipe.get("models") or []]
        except Exception:  # noqa: BLE001 - a hint only: the CLI reports a bad recipe
            return []

    args = list(argv)
    for i, a in enumerate(args):  # in command-line order: the order the merge reads them
        for flag in ("--base", "--expert", "--recipe"):
            if a.startswith(flag + "="):
                values = [a.split("=", 1)[1]]
            elif a == flag:
                values = []
                for b in args[i + 1 :]:  # --expert takes several
                    if b.startswith("-") or (values and flag != "--expert"):
                        break
                    values.append(b)
            else:
                continue
            for v in values:
                refs.extend(recipe_models(v) if flag == "--recipe" else [v])
        if a.endswith((".yaml", ".yml")) and not a.startswith("-") and (i == 0 or not args[i - 1].startswith("-")):
            refs.extend(recipe_models(a))  # mergekit's form: RECIPE OUT
    return [Path(r) for r in dict.fromkeys(refs) if r and Path(r).is_dir()]
