"""FFG's global threshold from a saliency histogram: pure functions of the bin counts (no
PyTorch), used by :class:`ota_trainer.backends.torch.ffg.SaliencyHistogram` and the native fast path alike,
so both pick the same bin.

Bins are ``bits(s) >> 42`` of the float64 saliency ``s`` (1024 bins per octave; bin 0 holds
the zeros), and a histogram threshold keeps exactly the entries whose bin is at least ``b``:
``s >= bin_edge(b)``.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["BIN_SHIFT", "N_BINS", "bin_edge", "density_bin"]

BIN_SHIFT = 42  # float64 bits >> 42: 11 exponent bits + 10 mantissa bits
N_BINS = 1 << (63 - BIN_SHIFT)  # 2**21 bins cover every non-negative float64


def bin_edge(b: int) -> float:
    """The smallest float64 whose bin is ``b`` (``bits = b << 42``)."""
    return struct.unpack("<d", struct.pack("<q", b << BIN_SHIFT))[0]


def density_bin(bins: Sequence[int], counts: Sequence[int], total: int, density: float) -> int | None:
    """The bin ``b >= 1`` whose kept count ``sum(counts[b:])`` is nearest ``density * total``
    (the lowest such bin on a tie), or None to keep everything.

    ``bins``: the histogram's non-empty bins in increasing order, ``counts`` their counts
    (empty bins change nothing: between two non-empty bins the kept count is constant).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    target = density * total
    zeros = counts[0] if bins and bins[0] == 0 else 0
    if density >= 1.0 or target >= (total - zeros) + 0.5 * zeros:
        return None
    best, best_err = None, None
    kept = sum(counts)
    prev = -1
    for b, c in zip(bins, counts):
        # bins prev+1 .. b keep every non-empty bin from b on: `kept`
        lo = max(1, prev + 1)
        if lo <= b:
            err = abs(float(kept) - target)
            if best_err is None or err < best_err:
                best, best_err = lo, err
        kept -= c
        prev = b
    if prev + 1 < N_BINS:  # past the last non-empty bin nothing is kept
        lo = max(1, prev + 1)
        err = abs(0.0 - target)
        if best_err is None or err < best_err:
            best = lo
    return best
