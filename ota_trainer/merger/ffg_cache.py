"""FFG's saliency histograms remembered between merges of the same inputs.

A global FFG threshold needs the histogram of every saliency of an expert before the first
entry can be merged: a full pass over base, expert and moments (half the CPU time of a 0.5B
``ota`` merge). The histogram depends on those files alone, not on the density or the share
asked for, so a second merge of the same experts (another density, another method option, a
re-run) takes it from here and reads the inputs once.

- **Where:** ``$OTA_TRAINER_CACHE/ffg`` (default ``~/.cache/ota_trainer/ffg``), owner-only like the
  kernel cache (:mod:`ota_trainer.io.cache`); ``OTA_TRAINER_FFG_CACHE=0`` turns it off.
- **Key:** as git's index knows a file unchanged, by every input file's path, device, inode,
  size, modification and change times (``st_ctime`` changes with any write, ``touch`` included),
  plus what the saliency is made of (score, the moments' bias-correction scale, the tensor
  names) and this format's version. A file from the Hub is a content-addressed blob in its cache.
  As in git, a file changed within the last seconds is "racy" (timestamps tick coarsely: a
  second write in the same tick leaves them equal), and nothing read from it is cached.
- **Checked, not trusted:** a cached histogram is validated when read (sizes, order, sums), and
  after the merge pass the entries the kernels actually kept must equal what it predicts, to
  the entry (with the native kernels under a density rule, also at the neighbouring bin edges,
  which proves the threshold: :meth:`~ota_trainer.backends.thresholds.Histogram.checks`);
  otherwise the merge is redone from a fresh count (:class:`StaleHistogram`) and the entry
  replaced. Experts can also ship their histogram (:mod:`.ffg_shipped`), checked the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from array import array
from pathlib import Path

from ..backends.thresholds import BIN_SHIFT, N_BINS, Histogram
from ..io.cache import open_private, private_folder, write_private

logger = logging.getLogger(__name__)

__all__ = ["ENV", "enabled", "histogram_key", "load", "store", "forget", "encode", "decode", "StaleHistogram"]

ENV = "OTA_TRAINER_FFG_CACHE"
FORMAT = 1  # bump when the saliency's arithmetic or the bins change
_MAGIC = b"OTAFFGH1"
_HEAD = struct.Struct("<8sQQ")  # magic, total, non-empty bins; then uint32 bins, int64 counts
_WHAT = "FFG histogram cache"
RACY_S = 2.0  # an input changed this recently keeps its histogram out of the cache
KEEP = 256  # histograms kept (~0.4 MB each for a 0.5B model): the least recently used go first


class StaleHistogram(Exception):
    """A cached histogram's prediction of the kept entries did not hold: the merge is redone."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def _identity(path: Path) -> list:
    real = os.path.realpath(path)
    st = os.stat(real)
    return [real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def histogram_key(files: list[Path], names: list[str], score: str, scale: float | None) -> str | None:
    """The cache key of an expert's histogram over ``names``; None (not cached) when a file
    cannot be stat'ed or changed too recently to be told apart from its next version (racy).
    ``files``: every file its saliencies read (base and expert shards, its moments)."""
    try:
        ids = sorted(_identity(f) for f in set(files))
    except OSError:
        return None
    if ids and max(max(i[4], i[5]) for i in ids) > (time.time() - RACY_S) * 1e9:
        logger.debug("an input of this expert changed in the last %.0f s: its FFG histogram is not cached", RACY_S)
        return None
    what = {
        "format": FORMAT,
        "bin_shift": BIN_SHIFT,
        "score": score,
        "scale": None if scale is None else float(scale).hex(),
        "names": hashlib.sha256("\0".join(sorted(names)).encode()).hexdigest(),
        "files": ids,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


_warned: set[str] = set()


def _folder() -> Path | None:
    try:
        return private_folder("ffg", _WHAT)
    except OSError as e:
        if str(e) not in _warned:  # once per process, not per expert and call
            _warned.add(str(e))
            logger.warning("FFG histograms are not cached: %s", e)
        return None


def encode(hist: Histogram) -> bytes:
    return (
        _HEAD.pack(_MAGIC, hist.total, len(hist.bins))
        + array("I", hist.bins).tobytes()
        + array("q", hist.counts).tobytes()
    )


def decode(data: bytes, where: str) -> Histogram:
    """A histogram from its bytes, validated.

    Raises:
        ValueError: naming ``where``, when the bytes are not a whole, consistent histogram."""
    if len(data) < _HEAD.size:
        raise ValueError(f"{where}: truncated ({len(data)} bytes)")
    magic, total, n = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError(f"{where}: not an FFG histogram of this format")
    if n > N_BINS or len(data) != _HEAD.size + 12 * n:
        raise ValueError(f"{where}: {len(data)} bytes for {n} bins")
    bins, counts = array("I"), array("q")
    bins.frombytes(data[_HEAD.size : _HEAD.size + 4 * n])
    counts.frombytes(data[_HEAD.size + 4 * n :])
    return Histogram.validated(bins.tolist(), counts.tolist(), total, where)


def load(key: str) -> Histogram | None:
    """The cached histogram of ``key``, or None (missing, refused or invalid: then it is dropped)."""
    folder = _folder()
    if folder is None:
        return None
    path = folder / f"{key}.hist"
    try:
        fd = open_private(path, "cached FFG histogram", "delete it (it is recounted)")
    except FileNotFoundError:
        return None
    except OSError as e:
        logger.warning("%s", e)
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(_HEAD.size + 12 * N_BINS + 1)
        try:
            hist = decode(data, str(path))
        except ValueError as e:
            logger.warning("ignoring a damaged cached FFG histogram (recounted): %s", e)
            hist = None
        else:
            os.utime(f.fileno())  # used now: the last to be evicted
    if hist is None:
        forget(key)
    return hist


def store(key: str, hist: Histogram) -> None:
    folder = _folder()
    if folder is None:
        return
    try:
        write_private(folder / f"{key}.hist", encode(hist))
        _evict(folder)
    except OSError as e:
        logger.warning("could not cache an FFG histogram in %s: %s", folder, e)


def _evict(folder: Path) -> None:
    """Keep the :data:`KEEP` most recently used histograms."""
    files = []
    for entry in os.scandir(folder):
        if entry.name.endswith(".hist") and entry.is_file(follow_symlinks=False):
            files.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.path))
    for _, path in sorted(files)[: max(0, len(files) - KEEP)]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def forget(key: str) -> None:
    folder = _folder()
    if folder is not None:
        try:
            os.unlink(folder / f"{key}.hist")
        except FileNotFoundError:
            pass
