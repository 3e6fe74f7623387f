"""Write a merged model as a normal Hugging Face folder, streaming one tensor at a time.

Every output tensor's name, shape and dtype is known before the merge starts (they are the
base model's), so :class:`StreamingSafetensorsWriter` plans the shards up front, writes each
shard's safetensors header first and then appends tensor bytes as they are produced. Memory
stays at one tensor, whatever the shard size.

The whole output is written into a temporary folder beside the destination and renamed into
place only when complete (:class:`OutputDir`), so a failed merge leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import mmap
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OutputError, OutputExistsError, brief
from .layout import (
    DTYPE_SIZES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    dtype_code,
    process_gone,
    safetensors_header,
)

logger = logging.getLogger(__name__)

__all__ = [
    "parse_size",
    "plan_shards",
    "StreamingSafetensorsWriter",
    "OutputDir",
    "output_for",
    "protected_paths",
    "rename_noreplace",
]


def parse_size(size: int | str) -> int:
    """Bytes from ``5000000`` or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``.

    Raises:
        ConfigError: the string is not a size.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ConfigError(f"cannot read {brief(size)} as a size; write e.g. '5GB' or '500MB'")
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(size)[:64].upper())
    if not m:
        raise ConfigError(f"cannot read {brief(size)} as a size; write e.g. '5GB' or '500MB'")
    unit = {"": 1, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2)]
    base = 1024 if (m.group(3) or "").startswith("I") else 1000
    n = int(float(m.group(1)) * base ** (unit if m.group(2) else 0))
    if n <= 0:
        raise ConfigError(f"shard size must be positive, got {brief(size)}")
    return n


def _uint8():
    import torch  # only callers holding torch tensors get here

    return torch.uint8


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return DTYPE_SIZES[dtype] * math.prod(shape)


@dataclass
class _Shard:
    file: str
    entries: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)  # dtype: safetensors code
    nbytes: int = 0


def plan_shards(tensors: list[tuple[str, tuple[int, ...], Any]], max_shard_bytes: int) -> list[_Shard]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets
    its own). Dtypes are torch dtypes or safetensors codes ("BF16")."""
    shards: list[_Shard] = [_Shard("")]
    for name, shape, dtype in tensors:
        dtype = dtype_code(dtype)
        n = _nbytes(shape, dtype)
        if shards[-1].entries and shards[-1].nbytes + n > max_shard_bytes:
            shards.append(_Shard(""))
        shards[-1].entries.append((name, tuple(shape), dtype))
        shards[-1].nbytes += n
    if len(shards) == 1:
        shards[0].file = SAFE_WEIGHTS_NAME
    else:
        for i, s in enumerate(shards):
            s.file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


# Output files are written with O_DIRECT where the filesystem allows it: bytes go from two
# reused, aligned staging buffers straight to the disk, on a background thread, instead of being
# copied into newly allocated page-cache pages on the merge's own cores (measured: 1 GB costs
# ~0.15 CPU-s instead of 0.4-2.8 CPU-s). OTA_TRAINER_DIRECT_IO=0 turns it off.
_ALIGN = 4096
STAGING_BYTES = 16 * 2**20


def _direct_io_wanted() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("OTA_TRAINER_DIRECT_IO", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


class _OutputFile:
    """Sequential writes to one new file: direct I/O through aligned staging buffers flushed by a
    background thread when possible (and ``direct``), else ordinary buffered writes. Errors of a
    background write surface at the next :meth:`write` or at :meth:`close`."""

    def __init__(self, path: Path, direct: bool = True):
        self.path = path
        self.size = 0
        self._fd = -1
        self._fh = None
        if direct and _direct_io_wanted():
            self._open_direct()
        if self._fd < 0:
            self._fh = open(path, "wb")

    def _open_direct(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError:
            return
        self._bufs = [mmap.mmap(-1, STAGING_BYTES) for _ in range(2)]  # page-aligned, as direct I/O wants
        self._views = [memoryview(b) for b in self._bufs]
        try:  # the probe: some filesystems accept O_DIRECT at open and refuse the writes
            os.pwrite(fd, self._views[0][:_ALIGN], 0)
        except OSError:
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        self._fd, self._cur, self._fill, self._flushed = fd, 0, 0, 0
        self._pending: list[Future | None] = [None, None]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ota-writer")

    def write(self, data: memoryview) -> None:
        self.size += len(data)
        if self._fh is not None:
            self._fh.write(data)
            return
        data = data.cast("B")
        while len(data):
            view = self._views[self._cur]
            n = min(len(data), STAGING_BYTES - self._fill)
            view[self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == STAGING_BYTES:
                self._submit(STAGING_BYTES)

    def reserve(self, n: int) -> memoryview | None:
        """The next ``n`` bytes of the file as writable staging memory (direct I/O only), else
        None. Whoever fills it calls :meth:`commit` before any other write: a producer that
        writes there saves the copy. When they do not fit in the current buffer's free part, the
        buffer's aligned part goes to the disk early and its unaligned tail moves to the other
        buffer, so any ``n`` up to a buffer less one block fits (measured: a 0.5B merge copied
        54 of its 309 tensors, 0.15 s, before)."""
        if self._fd < 0 or n == 0 or n > STAGING_BYTES - _ALIGN:  # (nothing to produce for an empty tensor)
            return None
        if n > STAGING_BYTES - self._fill:
            k, fill = self._cur, self._fill
            aligned = fill - fill % _ALIGN  # >= _ALIGN, as fill > STAGING_BYTES - n >= _ALIGN
            self._submit(aligned)  # (waits until the other buffer is free)
            tail = fill - aligned
            self._views[self._cur][:tail] = self._views[k][aligned:fill]  # (the disk reads only [:aligned] of k)
            self._fill = tail
        return self._views[self._cur][self._fill : self._fill + n]

    def commit(self, n: int) -> None:
        """The ``n`` bytes handed out by :meth:`reserve` are filled: they follow in the file."""
        self.size += n
        self._fill += n
        if self._fill == STAGING_BYTES:
            self._submit(STAGING_BYTES)

    def _submit(self, length: int) -> None:
        """Hand the current staging buffer (``length`` bytes, a multiple of the alignment) to the
        writer thread and wait until the other one is free."""
        k, off = self._cur, self._flushed
        self._pending[k] = self._pool.submit(self._pwrite_all, self._views[k][:length], off)
        self._flushed += length
        self._cur, self._fill = 1 - k, 0
        self._wait(self._cur)

    def _pwrite_all(self, view: memoryview, off: int) -> None:
        while len(view):
            n = os.pwrite(self._fd, view, off)
            view, off = view[n:], off + n

    def _wait(self, k: int) -> None:
        fut, self._pending[k] = self._pending[k], None
        if fut is not None:
            fut.result()  # re-raises the background write's error

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            return
        if self._fd < 0:
            return
        try:
            if self._fill:
                tail = self._fill
                pad = -tail % _ALIGN
                self._views[self._cur][tail : tail + pad] = bytes(pad)
                self._submit(tail + pad)
            self._wait(0)
            self._wait(1)
            os.ftruncate(self._fd, self.size)  # drop the last block's padding
        finally:
            self._release()

    def abort(self) -> None:
        """Close after an error, dropping what is not written yet (never raises: the first error matters)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
        elif self._fd >= 0:
            for k in (0, 1):
                try:
                    self._wait(k)
                except OSError:
                    pass
            self._release()

    def _release(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self._fd)
        self._fd = -1
        for v in self._views:
            v.release()
        for b in self._bufs:
            try:
                b.close()
            except BufferError:  # a slice still referenced by an exception's frames: freed with it
                pass


class StreamingSafetensorsWriter:
    """Writes tensors in a fixed, pre-announced order into sharded safetensors files.

    Args:
        folder: destination folder (exists).
        tensors: ``(name, shape, dtype)`` of every tensor, in the order they will be written.
        max_shard_bytes: shard size limit.
        metadata: string metadata for every shard header (``{"format": "pt"}`` is added).
        direct: write with direct I/O where the filesystem allows it (see above; the merge's
            output). False: through the page cache, for files read back at once (a LoRA
            expert's work files: direct I/O would send them to the disk and read them back).

    ``write(name, tensor)`` must be called once per tensor in the announced order;
    ``close()`` checks that all were written and writes ``model.safetensors.index.json``
    when there is more than one shard.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        tensors: list[tuple[str, tuple[int, ...], Any]],
        *,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        direct: bool = True,
    ):
        self.folder = Path(folder)
        self._direct = direct
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, e) for i, s in enumerate(self.shards) for e in s.entries]
        self._pos = 0
        self._shard = -1
        self._fh = None

    def _open_shard(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        shard = self.shards[i]
        entries, offset = [], 0
        for name, shape, dtype in shard.entries:
            n = _nbytes(shape, dtype)
            entries.append((name, list(shape), dtype, offset, offset + n))
            offset += n
        with output_errors(self.folder / shard.file):
            self._fh = _OutputFile(self.folder / shard.file, self._direct)
            self._fh.write(memoryview(safetensors_header(entries, self.metadata)))
        self._shard = i

    def write(self, name: str, tensor) -> None:
        """Write the next tensor: a torch tensor of the announced shape and dtype."""
        shape, dtype = tuple(tensor.shape), dtype_code(tensor.dtype)
        data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(_uint8()).numpy())
        self._append(name, shape, dtype, data)

    def write_bytes(self, name: str, shape: tuple[int, ...], dtype: str, data) -> None:
        """Write the next tensor as raw bytes (any buffer) of the announced shape and dtype code."""
        data = memoryview(data).cast("B")
        n = _nbytes(shape, dtype)
        if len(data) != n:
            raise ValueError(f"writer: {name!r} should be {n} bytes, got {len(data)}")
        self._append(name, tuple(shape), dtype, data)

    def reserve(self, name: str, shape: tuple[int, ...], dtype: str) -> memoryview | None:
        """Where the next tensor's bytes can be produced in place (the output's staging memory),
        or None: then pass them to :meth:`write_bytes`. After filling it, call :meth:`commit`."""
        self._next(name, tuple(shape), dtype)
        return self._fh.reserve(_nbytes(shape, dtype))

    def commit(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        """The memory :meth:`reserve` gave for tensor ``name`` holds its bytes: write them."""
        self._next(name, tuple(shape), dtype)
        with output_errors(self._fh.path):
            self._fh.commit(_nbytes(shape, dtype))
        self._pos += 1

    def _next(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        """Check that ``name`` is the tensor due next, and open its shard."""
        if self._pos >= len(self._order):
            raise ValueError(f"unexpected tensor {name!r}: every announced tensor was written already")
        i, (want, wshape, wdtype) = self._order[self._pos]
        if name != want or shape != wshape or dtype != wdtype:
            raise ValueError(f"writer expected {want!r} {wshape} {wdtype}, got {name!r} {shape} {dtype}")
        if i != self._shard:
            self._open_shard(i)

    def _append(self, name: str, shape: tuple[int, ...], dtype: str, data: memoryview) -> None:
        self._next(name, shape, dtype)
        with output_errors(self._fh.path):
            self._fh.write(data)
        self._pos += 1

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the files written."""
        if self._fh is not None:
            with output_errors(self._fh.path):
                self._fh.close()
            self._fh = None
        if self._pos != len(self._order):
            missing = [e[0] for _, e in self._order[self._pos : self._pos + 3]]
            raise ValueError(f"writer closed before every tensor was written (next: {missing})")
        files = [s.file for s in self.shards]
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {name: s.file for s in self.shards for name, _, _ in s.entries},
            }
            with output_errors(self.folder / SAFE_WEIGHTS_INDEX_NAME):
                (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            files.append(SAFE_WEIGHTS_INDEX_NAME)
        return files

    def abort(self) -> None:
        """Stop writing after an error: close the open file without flushing (never raises)."""
        if self._fh is not None:
            self._fh.abort()
            self._fh = None


@contextlib.contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` (a full disk, a read-only folder...) as an OutputError naming it."""
    try:
        yield
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"cannot write {path}: {e.strerror or e}", path=str(path)) from e


def _identity(path: Path) -> tuple[int, ...] | None:
    """What tells whether a folder entry changed: device, inode, type and modification time
    (a folder's changes whenever an entry is added to or removed from it); None when absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), st.st_mtime_ns


def _remove(path: Path) -> None:
    """Delete a folder tree or a single entry, never following a symlink."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, atomically where the kernel can
    (``renameat2(RENAME_NOREPLACE)``). Raises FileExistsError when ``dst`` exists."""
    fn = _renameat2()
    if fn is not None:
        import ctypes

        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(err, os.strerror(err), str(src))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def protected_paths(
    refs: list[str], extra: list[str | os.PathLike] = (), cache_dir: str | os.PathLike | None = None
) -> list[Path]:
    """What an output folder may neither be, contain, nor lie inside: the local folders among
    ``refs`` (model references of a recipe), ``extra`` paths (the recipe file), and the Hugging
    Face cache (``cache_dir``, ``$HF_HUB_CACHE``, ``$HF_HOME``, ~/.cache/huggingface), where
    models given as repo ids live. Symlinks resolved."""
    out = []
    for ref in refs:
        if isinstance(ref, str) and ref and Path(ref).expanduser().exists():
            out.append(Path(ref).expanduser())
    out += [Path(p) for p in extra]
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    out += [Path(p) for p in (cache_dir, env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE"), home) if p]
    return [Path(os.path.realpath(p)) for p in dict.fromkeys(out)]


class OutputDir:
    """The merge's output folder: checked and locked before any input is read, written atomically.

    On construction: ``dest`` is refused when it is, contains or lies inside a protected path
    (an input, the HF cache; symlinks resolved), even with ``overwrite``; when it is a file,
    or a non-empty folder without ``overwrite``; when its parent is a file or cannot be written.
    An exclusive lock (``.NAME.lock`` beside ``dest``, ``flock``) keeps other merges out until
    :meth:`release`, and what killed merges into ``dest`` left (``.NAME.tmp-PID``, ``.NAME.old-PID``
    of dead processes) is cleaned up, restoring a previous output that a killed replacement had
    moved aside.

    :meth:`stage` yields a temporary folder beside ``dest``; on success it replaces ``dest``
    atomically (``renameat2(RENAME_NOREPLACE)``), unless ``dest`` changed meanwhile (created,
    filled, replaced): then the finished merge is kept beside it as ``NAME.merged-TIME`` and
    :class:`~ota_trainer.errors.OutputError` says where. On failure the temporary folder is removed.

    Raises:
        OutputExistsError: ``dest`` is a file, or not empty without ``overwrite``.
        OutputError: ``dest`` overlaps an input or the HF cache, its parent is a file or
            read-only, another merge holds the lock.
    """

    def __init__(self, dest: str | os.PathLike, *, overwrite: bool = False, protect: list[Path] = ()):
        self.dest = Path(os.path.abspath(Path(dest).expanduser()))
        self.overwrite = overwrite
        self.tmp = self.dest.parent / f".{self.dest.name}.tmp-{os.getpid()}"
        self._lock_path = self.dest.parent / f".{self.dest.name}.lock"
        self._lock_fd = -1
        self._created: list[Path] = []
        real = Path(os.path.realpath(self.dest))
        for p in protect:
            if real == p or p in real.parents or real in p.parents:
                how = "is" if real == p else "lies inside" if p in real.parents else "contains"
                raise OutputError(
                    f"output {self.dest} {how} {p}, an input of this merge or the Hugging Face cache; choose an --out "
                    "elsewhere (refused even with --overwrite: replacing it would destroy the input)",
                    path=str(self.dest),
                )
        self._make_parent()
        try:
            self._lock()
            self._clean_leftovers()
            if self.dest.exists() and not self.dest.is_dir():
                raise OutputExistsError(f"output {self.dest} exists and is a file; choose another --out")
            if self.dest.is_dir() and any(self.dest.iterdir()) and not overwrite:
                raise OutputExistsError(
                    f"output folder {self.dest} exists and is not empty; pass --overwrite to replace it"
                )
            self._identity = _identity(self.dest)
        except BaseException:
            self.release(failed=True)
            raise

    # -- set-up ---------------------------------------------------------------------------------------
    def _make_parent(self) -> None:
        missing = []
        p = self.dest.parent
        while not os.path.lexists(p):
            missing.append(p)
            p = p.parent
        if not p.is_dir():
            raise OutputError(f"cannot create output {self.dest}: {p} is a file, not a folder", path=str(self.dest))
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as e:
                raise OutputError(f"cannot create output folder {d}: {e.strerror or e}", path=str(d)) from e
            self._created.append(d)

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        while True:
            try:
                fd = os.open(
                    self._lock_path,
                    os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                    0o644,
                )
            except OSError as e:
                raise OutputError(
                    f"cannot write output {self.dest}: {e.strerror or e} ({self._lock_path})", path=str(self.dest)
                ) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputError(
                        f"another merge is writing {self.dest} (it holds {self._lock_path}); wait for it "
                        "to finish or choose another --out",
                        path=str(self.dest),
                    ) from e
                raise OutputError(f"cannot lock output {self.dest}: {e.strerror or e}", path=str(self.dest)) from e
            # the merge that held it unlinks the file when done: make sure ours is the one at the path
            try:
                st, now = os.fstat(fd), os.lstat(self._lock_path)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    self._lock_fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)

    def _clean_leftovers(self) -> None:
        """Remove what merges into ``dest`` that died left beside it (this process holds the lock,
        so no live merge into ``dest`` is writing them)."""
        pattern = re.compile(rf"\.{re.escape(self.dest.name)}\.(tmp|old)-(\d+)")
        for entry in sorted(self.dest.parent.iterdir()):
            m = pattern.fullmatch(entry.name)
            if m is None or not process_gone(int(m.group(2))):
                continue
            try:
                if m.group(1) == "old" and not os.path.lexists(self.dest):
                    os.rename(entry, self.dest)  # killed between moving the old output aside and the new one in
                    logger.warning("restored %s, which a killed merge had moved to %s", self.dest, entry.name)
                else:
                    _remove(entry)
                    logger.info("removed %s, left by a merge into %s that did not finish", entry, self.dest)
            except OSError as e:
                logger.warning("could not remove %s, left by a merge that did not finish: %s", entry, e)

    # -- the output -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self) -> Iterator[Path]:
        """A fresh temporary folder for the output; moved to ``dest`` when the block succeeds."""
        if os.path.lexists(self.tmp):
            _remove(self.tmp)
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise OutputError(
                f"cannot write output {self.dest}: {e.strerror or e} ({self.tmp})", path=str(self.dest)
            ) from e
        try:
            yield self.tmp
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self._commit()

    def _commit(self) -> None:
        now = _identity(self.dest)
        if now != self._identity:
            self._keep("changed while the merge ran (created, filled or replaced by someone else)")
        old = None
        if now is not None:
            old = self.dest.parent / f".{self.dest.name}.old-{os.getpid()}"
            try:
                os.rename(self.dest, old)
            except OSError as e:
                self._keep(f"could not be replaced ({e.strerror or e})")
            if _identity(old) != now:  # replaced between the check and the rename
                self._restore(old)
                self._keep("changed while the merge ran")
        try:
            rename_noreplace(self.tmp, self.dest)
        except FileExistsError:
            if old is not None:
                self._restore(old)
            self._keep("appeared while the merge ran")
        except OSError as e:
            if old is not None:
                self._restore(old)
            self._keep(f"could not be written ({e.strerror or e})")
        if old is not None:
            try:
                _remove(old)
            except OSError as e:
                logger.warning("could not remove the replaced output %s: %s", old, e)

    def _restore(self, old: Path) -> None:
        try:
            rename_noreplace(old, self.dest)
        except OSError:
            logger.warning("the previous content of %s is at %s", self.dest, old)

    def _keep(self, why: str) -> None:
        """Keep the finished merge beside ``dest`` under a name of its own, and raise."""
        kept = self.dest.parent / f"{self.dest.name}.merged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            rename_noreplace(self.tmp, kept)
        except OSError:
            kept = self.tmp
        raise OutputError(
            f"output {self.dest} {why}; the finished merge was kept at {kept} (move it where you want it)",
            path=str(self.dest),
            kept=str(kept),
        )

    def release(self, *, failed: bool = False) -> None:
        """Give up the lock (and, after a failure, the empty parent folders this made)."""
        if self._lock_fd >= 0:
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1
        if failed or not self.dest.exists():
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except OSError:
                    break
        self._created = []

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)


def output_for(
    recipe, out_dir: str | os.PathLike, *, overwrite: bool = False, resolver=None, extra: list[str | os.PathLike] = ()
) -> OutputDir:
    """The :class:`OutputDir` of a merge of ``recipe`` (a :class:`~ota_trainer.merger.recipe.MergeRecipe`):
    its local models, ``extra`` paths (the recipe file) and the Hugging Face cache protected."""
    refs = recipe.refs
    return OutputDir(
        out_dir, overwrite=overwrite, protect=protected_paths(refs, list(extra), getattr(resolver, "cache_dir", None))
    )
