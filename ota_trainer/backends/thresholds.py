"""FFG's saliency bins and thresholds, the contract between the runner and the backends: the
keep rule (:class:`Threshold`) and the global threshold from a saliency histogram
(:class:`Histogram`, :func:`density_bin`): pure functions of the bin counts (no PyTorch),
whichever backend counted them, so every backend picks the same bin.

Bins are ``bits(s) >> 42`` of the float64 saliency ``s`` (1024 bins per octave; bin 0 holds
the zeros), and a histogram threshold keeps exactly the entries whose bin is at least ``b``:
``s >= bin_edge(b)``.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate

__all__ = [
    "SCORES",
    "BIN_SHIFT",
    "N_BINS",
    "bin_edge",
    "density_bin",
    "share_bin",
    "share_proved",
    "share_summation_depth",
    "Threshold",
    "KEEP_ALL",
    "Histogram",
]

SCORES = ("fisher", "magnitude")  # FFG saliency scores: v * d^2, or d^2 (the paper's ablation)

BIN_SHIFT = 42  # float64 bits >> 42: 11 exponent bits + 10 mantissa bits
N_BINS = 1 << (63 - BIN_SHIFT)  # 2**21 bins cover every non-negative float64


def bin_edge(b: int) -> float:
    """The smallest float64 whose bin is ``b`` (``bits = b << 42``)."""
    return struct.unpack("<d", struct.pack("<q", b << BIN_SHIFT))[0]


def density_bin(bins: Sequence[int], counts: Sequence[int], total: int, density: float) -> int | None:
    """The bin ``b >= 1`` whose kept count ``sum(counts[b:])`` is nearest ``density * total``
    (the lowest such bin on a tie), or None to keep everything.

    ``bins``: the histogram's non-empty bins in increasing order, ``counts`` their (positive)
    counts. Empty bins change nothing: between two non-empty bins the kept count is constant, so
    the candidates are bin 1 and the bin after each non-empty one, and their kept counts fall
    strictly from one to the next: the nearest is one of the two around the crossing of the
    target, found by bisection (a loop over the ~30k non-empty bins of a model took 0.06 s per
    expert).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    target = density * total
    zeros = counts[0] if bins and bins[0] == 0 else 0
    if density >= 1.0 or target >= (total - zeros) + 0.5 * zeros:
        return None
    n = len(bins)
    top = list(accumulate(reversed(counts)))  # top[r]: the entries of the r + 1 highest non-empty bins

    def candidate(i: int) -> tuple[int, float] | None:
        """Candidate i (its lowest bin, its kept count): keeping non-empty bins i.. (i = n: none)."""
        lo = max(1, bins[i - 1] + 1) if i > 0 else 1
        if i < n:
            return (lo, float(top[n - 1 - i])) if lo <= bins[i] else None  # (bin 0 is never a threshold)
        return (lo, 0.0) if lo < N_BINS else None

    j = n - bisect.bisect_left(top, target)  # the first candidate keeping fewer than the target
    best = None
    for c in (candidate(j - 1) if j > 0 else None, candidate(j)):
        if c is not None and (best is None or abs(c[1] - target) < abs(best[1] - target)):
            best = c
    return None if best is None else best[0]


FINITE_BINS = 0x7FF << (52 - BIN_SHIFT)  # bins from here on hold +inf and NaN


def _middle(b: int) -> float:
    """Bin ``b``'s middle value (its mass per entry under the saliency-share rule)."""
    return struct.unpack("<d", struct.pack("<q", (b << BIN_SHIFT) | (1 << (BIN_SHIFT - 1))))[0]


def share_bin(bins: Sequence[int], counts: Sequence[int], share: float) -> int | None:
    """The highest bin ``b`` whose kept mass (the entries of bins ``>= b``) holds ``share`` of
    the histogram's saliency mass, or None to keep everything: the fewest top entries holding
    that share.

    A bin's mass is its count times its middle value (exact to 0.05%: a bin is under 0.1% wide);
    bin 0 (zero saliency) and the +inf/NaN bins carry none. Masses are added from the top bin
    down, in float64 (no overflow: finite float32 inputs give saliencies in [2**-596, 2**384]);
    both backends call this, so they keep the same entries.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"saliency share must be in (0, 1], got {share}")
    if share >= 1.0:
        return None
    masses = [(b, c * _middle(b)) for b, c in zip(bins, counts) if 0 < b < FINITE_BINS]
    total = 0.0
    for _, m in reversed(masses):
        total += m
    if not masses or total <= 0.0:
        return None
    target, kept = share * total, 0.0
    for b, m in reversed(masses):
        kept += m
        if kept >= target:
            return b
    return masses[0][0]  # (rounding: the sum from the top is the total)


def _gamma(n: int) -> Fraction:
    """The relative error bound of a float64 sum of ``n`` non-negative terms, in any order:
    ``n u / (1 - n u)`` with ``u = 2^-53`` (Higham, Accuracy and Stability, 2nd ed., 4.2)."""
    nu = Fraction(n, 1 << 53)
    if nu >= 1:
        raise ValueError(f"{n} terms: no float64 error bound")
    return nu / (1 - nu)


def share_summation_depth(views: Sequence[tuple[int, int]], threads: int) -> int:
    """The most float64 additions any one entry's mass goes through in the merge pass's sums (see
    ``share_masses`` in kernels.c), for tensors merged as (m, n) matrices ``views`` on ``threads``
    threads: 64 in its lane of a chunk (a row's next <= 512 entries), 8 per chunk of its call (a
    thread's rows of one tensor, summed into the call's masses) and one per call after it (the
    calls' sums added up in Python)."""
    chunks = max((m * -(-n // 512) for m, n in views), default=0)
    return 64 + 8 * chunks + len(views) * max(threads, 1)


def share_proved(share: float, masses: Sequence[float], depth: int) -> bool:
    """Whether :func:`share_bin` on the histogram a merge pass saw picks bin ``b``, given the
    masses that pass added up (``masses``: of its entries in bins above ``b``, in bin ``b`` and in
    the bins below, as the rule weighs them: each entry its bin's middle; bin 0 and the +inf/NaN
    bins nothing), each term through at most ``depth`` float64 additions
    (:func:`share_summation_depth`).

    Each true mass is within a factor ``1 +- g`` of the pass's sum, ``g = gamma(depth)``: a sum of
    non-negative terms errs by at most ``gamma(h)`` of itself, ``h`` the additions a term goes
    through (Higham, 4.2). The rule sums the bins' masses (each exact: a count below 2^41 times a
    middle of 12 significant bits) from the top in float64, within ``1 +- G`` of the truth
    (``G = gamma(N_BINS)``), and rounds ``share * total`` once. So it picks ``b`` when, at the
    worst of both errors, the mass from ``b`` up still reaches the target and the mass above
    ``b`` still falls short of it, and bin ``b`` is not empty. Exact rational arithmetic; False
    when that cannot be shown (the merge is then redone from a fresh count)."""
    above, at, below = (Fraction(m) for m in masses)  # (floats convert exactly)
    if not (at > 0 and above >= 0 and below >= 0) or not 0 < depth < 1 << 41 or not 0.0 < share < 1.0:
        return False
    g, G, u, s = _gamma(depth), _gamma(N_BINS), Fraction(1, 1 << 53), Fraction(share)
    total_hi, total_lo = (above + at + below) / (1 - g), (above + at + below) / (1 + g)
    reaches = (above + at) / (1 + g) * (1 - G) >= s * total_hi * (1 + G) * (1 + u)
    short = above / (1 - g) * (1 + G) < s * total_lo * (1 - G) * (1 - u)
    return reaches and short


@dataclass(frozen=True)
class Threshold:
    """A keep rule ``M = s >= theta`` (``theta = value``; 0 keeps everything).

    When ``bin`` is set the rule is "histogram bin >= bin" (``value = bin_edge(bin)``), which is
    what a density-derived global threshold means.
    """

    value: float
    bin: int | None = None

    @classmethod
    def absolute(cls, theta: float) -> Threshold:
        """The paper's absolute threshold ``theta`` (e.g. 2.6e-19)."""
        return cls(max(float(theta), 0.0))

    @classmethod
    def at_bin(cls, b: int) -> Threshold:
        return cls(bin_edge(b), bin=b)

    @property
    def keeps_all(self) -> bool:
        return self.value <= 0.0

    @property
    def log2_value(self) -> float:
        """``log2(theta)`` (``-inf`` for the keep-everything threshold), as reports give it."""
        return math.log2(self.value) if self.value > 0 else -math.inf

    @property
    def theta(self) -> float:
        return self.value


KEEP_ALL = Threshold(0.0)


@dataclass
class Histogram:
    """One expert's saliency histogram: its non-empty ``bins`` in increasing order, their
    (positive) ``counts``, and how many entries were counted (``total``, zeros included)."""

    bins: list[int]
    counts: list[int]
    total: int

    @classmethod
    def validated(cls, bins: Sequence[int], counts: Sequence[int], total: int, where: str) -> Histogram:
        """A histogram read from a file (``where``), checked whole: bins increasing and in range,
        counts positive and adding up to ``total``.

        Raises:
            ValueError: naming ``where``."""
        if len(bins) != len(counts) or len(bins) > N_BINS:
            raise ValueError(f"{where}: {len(bins)} bins for {len(counts)} counts")
        if (
            any(b >= N_BINS for b in bins[-1:])
            or any(b < 0 for b in bins[:1])
            or any(a >= b for a, b in zip(bins, bins[1:]))
        ):
            raise ValueError(f"{where}: bins out of order or range")
        if any(c <= 0 for c in counts) or sum(counts) != total:
            raise ValueError(f"{where}: counts are not positive or do not add up to {total}")
        return cls(list(bins), list(counts), total)

    @classmethod
    def from_dense(cls, counts: memoryview, total: int) -> Histogram:
        """From ``counts`` (int64[N_BINS], any buffer), scanned as bytes: most of it is empty."""
        raw = counts.cast("B")
        bins: list[int] = []
        step = 1 << 16  # bytes per probe
        zero = bytes(step)
        for off in range(0, len(raw), step):
            chunk = raw[off : off + step]
            if chunk.tobytes() == zero[: len(chunk)]:  # (a memoryview compares byte by byte: 10x slower)
                continue
            base = off // 8
            bins.extend(base + j for j, c in enumerate(chunk.cast("q")) if c)
        return cls(bins, [counts[b] for b in bins], total)

    def dense(self) -> memoryview:
        """The counts as int64[N_BINS]."""
        out = memoryview(bytearray(N_BINS * 8)).cast("q")
        for b, c in zip(self.bins, self.counts):
            out[b] = c
        return out

    def kept(self, threshold: Threshold) -> int:
        """The entries a bin-edge threshold (or keep-everything) keeps."""
        if threshold.keeps_all:
            return self.total
        if threshold.bin is None:
            raise ValueError("an absolute threshold's kept count is not a histogram's")
        return sum(self.counts[bisect.bisect_left(self.bins, threshold.bin) :])

    def checks(self, threshold: Threshold) -> tuple[float, float, int, int] | None:
        """What proves that :meth:`density_threshold` on *another* histogram of the same total
        picks ``threshold`` (bin ``b``, taken from this one): the edges of bins ``b - 1`` and
        ``b + 1`` and this histogram's kept counts at them, ``(lo, hi, K(b - 1), K(b + 1))``; or
        None when ``threshold`` cannot be proved this way (keep-everything, or bins ``b - 1`` or
        ``b`` empty here).

        Why three counts suffice: kept counts ``K`` fall with the bin, and the rule picks the
        lowest bin of the count nearest the target. With ``b - 1`` and ``b`` non-empty here, ``b``
        and ``b + 1`` are neighbouring candidates, and so are ``b - 1``'s and ``b``; the rule chose
        ``b`` over both (strictly over the lower one). If the other histogram has the same
        ``K(b - 1)``, ``K(b)`` and ``K(b + 1)``, every bin below ``b - 1`` keeps at least
        ``K(b - 1)`` and every bin above ``b + 1`` at most ``K(b + 1)``, ``b`` is still the lowest
        bin of its count (``K(b - 1) > K(b)``), and the target is the same: it picks ``b`` too
        (and not keep-everything: ``K(1) >= K(b - 1)`` keeps that below the target's bound).
        (tests/test_ffg_shipped.py checks this against the rule on random histograms.)"""
        b = threshold.bin
        if b is None or not 2 <= b < N_BINS - 1:
            return None
        i = bisect.bisect_left(self.bins, b)
        if i == 0 or i >= len(self.bins) or self.bins[i] != b or self.bins[i - 1] != b - 1:
            return None
        above = sum(self.counts[i:])
        return bin_edge(b - 1), bin_edge(b + 1), above + self.counts[i - 1], above - self.counts[i]

    def share_masses(self, b: int) -> tuple[float, float, float]:
        """The masses :func:`share_proved` takes, of this histogram, exactly (then rounded): of its
        bins above ``b``, of bin ``b`` and of the bins below (bin 0 and +inf/NaN bins none)."""
        parts = [Fraction(0), Fraction(0), Fraction(0)]
        for x, c in zip(self.bins, self.counts):
            if 0 < x < FINITE_BINS:
                parts[0 if x > b else 1 if x == b else 2] += c * Fraction(_middle(x))
        return tuple(float(m) for m in parts)

    def share_threshold(self, share: float) -> tuple[Threshold, int]:
        """The bin-edge threshold keeping the fewest top entries that hold ``share`` of the
        saliency mass (:func:`share_bin`), and the entries it keeps."""
        b = share_bin(self.bins, self.counts, share)
        threshold = KEEP_ALL if b is None else Threshold.at_bin(b)
        return threshold, self.kept(threshold)

    def density_threshold(self, density: float) -> tuple[Threshold, int]:
        """The bin-edge threshold whose kept fraction is nearest ``density``, and the entries it keeps."""
        b = density_bin(self.bins, self.counts, self.total, density)
        threshold = KEEP_ALL if b is None else Threshold.at_bin(b)
        return threshold, self.kept(threshold)
