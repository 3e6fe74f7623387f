"""The per-user cache folders (``$OTA_TRAINER_CACHE``, default ``~/.cache/ota_trainer``): created
owner-only, and trusted only while nobody else can write to them, since what they hold decides
what runs (the kernel library) or what a merge keeps (FFG's saliency histograms). Files in them
are written atomically and read without following links."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["cache_root", "private_folder", "check_folder", "open_private", "write_private"]

POSIX = hasattr(os, "geteuid")  # owners and mode bits to check
# cache files are opened for reading without following links (nor blocking on a planted FIFO)
_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def cache_root() -> Path:
    """``$OTA_TRAINER_CACHE``, else ``$XDG_CACHE_HOME/ota_trainer`` (``~/.cache/ota_trainer``)."""
    root = os.environ.get("OTA_TRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ota_trainer"
    )
    return Path(root)


def _make_private(path: Path) -> None:
    """Create the folder owner-only (0o700 whatever the umask); one that exists is left as it is
    (:func:`check_folder` judges it)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)


def private_folder(name: str, what: str) -> Path:
    """``cache_root() / name``, created owner-only (with the root) and checked (:func:`check_folder`)."""
    folder = cache_root() / name
    folder.parent.parent.mkdir(parents=True, exist_ok=True)  # e.g. ~/.cache: an ordinary folder
    _make_private(folder.parent)
    _make_private(folder)
    check_folder(folder, what)
    return folder


def ours(st: os.stat_result) -> bool:
    return not POSIX or st.st_uid in (os.geteuid(), 0)


def check_folder(folder: Path, what: str) -> None:
    """Refuse a cache others can write to (they could plant a file there for us to use): the
    folder must be a real folder (not a link) of ours (or root's) that only its owner can write;
    so must the folder holding it (the cache root), unless that is sticky like ``/tmp``.
    ``what`` names the cache in the error (e.g. "kernel cache")."""
    if not POSIX:
        return
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise OSError(
            f"refusing the {what} {folder}: it is {kind}; remove it (it is recreated) "
            "or set OTA_TRAINER_CACHE to a folder of your own"
        )
    root = folder.parent  # followed if a link: the folder it names is judged
    for path, info, fix in ((folder, st, f"chmod 700 {folder}"), (root, os.stat(root), f"chmod go-w {root}")):
        if not ours(info):
            raise OSError(
                f"refusing the {what} {path}: it belongs to another user (uid {info.st_uid}); "
                "set OTA_TRAINER_CACHE to a folder of your own"
            )
        if info.st_mode & 0o022 and not (path != folder and info.st_mode & stat.S_ISVTX):
            raise OSError(
                f"refusing the {what} {path}: other users can write to it; run `{fix}` "
                "(or set OTA_TRAINER_CACHE to a folder of your own)"
            )


def open_private(path: Path, what: str, fix: str) -> int:
    """Open a cache file for reading if it is a regular file of ours that others cannot write (a
    link is not followed); returns the descriptor. ``what`` names the file in the error, ``fix``
    says what to do (e.g. "delete it (it is rebuilt)")."""

    def check(st: os.stat_result) -> None:
        problem = (
            "is a symbolic link"
            if stat.S_ISLNK(st.st_mode)
            else "is not a regular file"
            if not stat.S_ISREG(st.st_mode)
            else f"belongs to another user (uid {st.st_uid})"
            if not ours(st)
            else "is writable by other users"
            if POSIX and st.st_mode & 0o022
            else None
        )
        if problem:
            raise OSError(f"refusing the {what} {path}: it {problem}; {fix}")

    check(os.lstat(path))
    fd = os.open(path, _READ)
    try:
        check(os.fstat(fd))  # the file opened, not the name looked at
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (beside it, then renamed), owner-only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent)  # 0o600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
