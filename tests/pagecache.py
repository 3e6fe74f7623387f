"""Page-cache residency of files, for tests of how the merge writes them (Linux: mincore)."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np


def resident_share(path: Path) -> float:
    """The share of a file's pages in the page cache (mincore on a map of it)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as mm:
        addr = np.frombuffer(mm, dtype=np.uint8)  # (the map's address; released before it closes)
        rc = ctypes.CDLL(None, use_errno=True).mincore(ctypes.c_void_p(addr.ctypes.data), ctypes.c_size_t(size), vec)
        del addr
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec) / pages


def direct_io_works(folder: Path) -> bool:
    """Whether files in ``folder`` can be written with O_DIRECT (tmpfs, for one, refuses it)."""
    try:
        fd = os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except (AttributeError, OSError):
        return False
    try:
        with mmap.mmap(-1, 4096) as block:
            os.pwrite(fd, block, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(folder / ".probe")
