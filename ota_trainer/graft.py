"""Fast Fisher Grafting (FFG): revert low-saliency fine-tuning edits (method.md §3).

Saliency of edit ``d_t = w_t - w0`` with second moment ``v_t``::

    s_t = v_t * d_t**2            (score="fisher", the paper's FFG)
    s_t = d_t**2                  (score="magnitude", the paper's ablation)

Keep mask ``M_t = s_t >= theta_t``; grafted weights ``w0 + M_t * d_t``.

Scores span hundreds of binary orders of magnitude and underflow float32 when squared, so
everything here works on ``log2(s)`` (``-inf`` for zero saliency). A *global* threshold for
a target density (fraction of an expert's entries kept, over all its parameters) is found
with a streaming log-space histogram (:class:`SaliencyHistogram`): one pass accumulates
counts into 2**20 bins of 1/1024 octave, then the bin edge whose kept count is nearest the
target is chosen. Masks in the merge pass use the same binning, so the achieved density
is exactly the count the histogram predicted.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "SCORES",
    "log_saliency",
    "SaliencyHistogram",
    "Threshold",
    "per_tensor_threshold",
    "keep_mask",
    "bin_cut",
    "graft",
]

SCORES = ("fisher", "magnitude")
LOG2_LO = -1024.0  # below every log2 score float32 inputs can produce (>= -149 - 2*149)
LOG2_HI = 1024.0
BINS_PER_OCTAVE = 1024
N_BINS = int((LOG2_HI - LOG2_LO) * BINS_PER_OCTAVE)  # 2**21
_CHUNK = 1 << 19  # elements per chunk when binning: temporaries stay in cache
_ONES = torch.ones(_CHUNK, dtype=torch.int64)


@torch.no_grad()
def log_saliency(
    delta: torch.Tensor,
    v: torch.Tensor | None,
    score: str = "fisher",
    *,
    log2_factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``log2(s)`` with ``s = v * d**2`` (fisher) or ``s = d**2`` (magnitude); ``-inf`` where ``s == 0``.

    Computed as ``2*log2|d| + log2(v)`` so that tiny saliencies do not underflow. For a
    rank-one ``v = outer(a, b)`` (viewed as a matrix) give ``log2_factors = (log2(a), log2(b))``
    instead of ``v``: then ``log2(v)`` is never materialised and the
    whole score costs four passes over the tensor.
    """
    out = delta.abs().to(torch.float32).log2_()  # fresh float32 memory: edited in place below
    if score == "magnitude":
        return out.mul_(2.0)
    if score != "fisher":
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    if log2_factors is not None:
        la, lb = log2_factors
        mat = out.view(la.numel(), lb.numel())  # (m, n)
        torch.add(la[:, None], mat, alpha=2.0, out=mat)  # 2*log2|d_ij| + log2 a_i (exact scaling by 2)
        mat.add_(lb[None, :])
        return out
    if v is None:
        raise ValueError("fisher saliency needs the second moment v")
    return out.mul_(2.0).add_(torch.log2(v.to(torch.float32)))


def _bin_index(log_s: torch.Tensor, *, consume: bool = False) -> torch.Tensor:
    """Histogram bin of each log2 score (int64). Bin 0 (log2 <= -1024, below any real float32
    saliency) holds the zero saliencies (``-inf``) and NaN; the top bin holds ``+inf``.

    ``(log_s - LO) * BPO`` is computed as ``log_s * BPO - LO * BPO``: scaling by a power of
    two is exact, so both round alike (:func:`keep_mask` relies on it). With ``consume`` the
    scores' memory is reused.
    """
    idx = log_s.mul_(BINS_PER_OCTAVE) if consume else log_s * BINS_PER_OCTAVE
    idx.sub_(LOG2_LO * BINS_PER_OCTAVE).nan_to_num_(nan=0.0, neginf=0.0, posinf=N_BINS - 1.0)
    # No clamp needed: finite float32 scores lie in [-447, 384] octaves (3 x float32's exponent
    # range), well inside [LO, HI); non-negative, so truncation is floor.
    return idx.to(torch.int64)


@dataclass(frozen=True)
class Threshold:
    """A keep rule ``M = s >= theta``.

    ``log2_value`` is ``log2(theta)`` (``-inf`` keeps everything). When ``bin`` is set the rule
    is "histogram bin >= bin", which is what a density-derived global threshold means.
    """

    log2_value: float
    bin: int | None = None

    @classmethod
    def absolute(cls, theta: float) -> "Threshold":
        """The paper's absolute threshold ``theta`` (e.g. 2.6e-19)."""
        return cls(math.log2(theta) if theta > 0 else -math.inf)

    @property
    def theta(self) -> float:
        """The threshold on the saliency scale (may underflow to 0.0 for very small ones)."""
        return 2.0 ** self.log2_value if self.log2_value > -1075 else 0.0


class SaliencyHistogram:
    """Streaming histogram of ``log2`` saliencies of one expert over all its parameters.

    >>> h = SaliencyHistogram()
    >>> h.add(log_saliency(d, v))          # once per tensor
    >>> thr = h.threshold_for_density(0.4)  # global threshold
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(N_BINS, dtype=torch.int64)  # counts[0]: zero saliency
        self.total = 0

    @torch.no_grad()
    def add(self, log_s: torch.Tensor, *, consume: bool = False) -> None:
        """Count one tensor's log2 saliencies; ``consume=True`` lets it overwrite ``log_s``."""
        flat = log_s.reshape(-1)
        self.total += flat.numel()
        for start in range(0, flat.numel(), _CHUNK):
            idx = _bin_index(flat[start : start + _CHUNK], consume=consume)
            # scatter_add into the running counts: as fast as bincount per element, without
            # allocating and adding a 2**21-bin histogram per call
            self.counts.scatter_add_(0, idx, _ONES[: idx.numel()])

    @property
    def zeros(self) -> int:
        """Entries with zero saliency (they are never kept by a finite threshold)."""
        return int(self.counts[0])

    def threshold_for_density(self, density: float) -> Threshold:
        """The bin-edge threshold whose kept fraction is nearest ``density``."""
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        target = density * self.total
        zeros = self.zeros
        nonzero = self.total - zeros
        if density >= 1.0 or target >= nonzero + 0.5 * zeros:
            return Threshold(-math.inf)
        kept_from = torch.flip(torch.cumsum(torch.flip(self.counts, [0]), 0), [0])  # kept_from[b] = sum(counts[b:])
        b = 1 + int(torch.argmin((kept_from[1:].to(torch.float64) - target).abs()))  # bin 0 is "zero saliency"
        return Threshold(LOG2_LO + b / BINS_PER_OCTAVE, bin=b)

    def threshold_for_share(self, share: float) -> Threshold:
        """The bin-edge threshold keeping the fewest top entries that hold ``share`` of the
        expert's total saliency ``sum(s)`` (a density rule that adapts to each expert).

        Bin masses are ``count_b * 2**center_b``, exact to 1/2048 octave.
        """
        if not 0.0 < share <= 1.0:
            raise ValueError(f"saliency share must be in (0, 1], got {share}")
        if share >= 1.0:
            return Threshold(-math.inf)
        log_center = LOG2_LO + (torch.arange(N_BINS, dtype=torch.float64) + 0.5) / BINS_PER_OCTAVE
        nonzero = self.counts > 0
        nonzero[0] = False  # zero saliency carries no mass
        if not nonzero.any():
            return Threshold(-math.inf)
        shift = float(log_center[nonzero].max())  # scale so the largest bin's mass is ~1 (no overflow)
        mass = self.counts.to(torch.float64) * torch.exp2((log_center - shift).clamp_(max=0.0))  # empty bins above: 0, not 0*inf
        kept_mass = torch.flip(torch.cumsum(torch.flip(mass, [0]), 0), [0])  # kept_mass[b] = mass of bins >= b
        b = max(1, int(torch.nonzero(kept_mass >= share * float(kept_mass[0])).max()))
        return Threshold(LOG2_LO + b / BINS_PER_OCTAVE, bin=b)

    def kept(self, threshold: Threshold) -> int:
        """Entries a threshold keeps (exact for histogram thresholds)."""
        if threshold.log2_value == -math.inf:
            return self.total
        b = threshold.bin if threshold.bin is not None else int((threshold.log2_value - LOG2_LO) * BINS_PER_OCTAVE)
        return int(self.counts[max(b, 0) :].sum())


@torch.no_grad()
def per_tensor_threshold(log_s: torch.Tensor, density: float) -> Threshold:
    """Threshold keeping the top ``density`` fraction of one tensor's entries (ablation, TIES)."""
    n = log_s.numel()
    k = int(round(density * n))
    if k >= n:
        return Threshold(-math.inf)
    if k <= 0:
        return Threshold(math.inf)
    kth = torch.kthvalue(log_s.reshape(-1).to(torch.float32), n - k + 1).values.item()  # k-th largest
    return Threshold(kth)


@torch.no_grad()
def keep_mask(log_s: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """``M = s >= theta`` as a bool tensor of ``log_s``'s shape."""
    if threshold.log2_value == -math.inf:
        return torch.ones_like(log_s, dtype=torch.bool)
    if threshold.bin is None:
        return log_s >= threshold.log2_value
    return log_s >= bin_cut(threshold.bin)


@functools.lru_cache(maxsize=256)
def bin_cut(b: int) -> float:
    """The smallest float32 ``x`` whose histogram bin is ``>= b``: one comparison then decides
    exactly what :func:`_bin_index` decided.

    bin(x) >= b  <=>  fl32(x - LO) >= b / BPO (the scaling by BPO, a power of two, is exact),
    a monotone predicate of ``x``. ``b / BPO + LO`` satisfies it; rounding of ``x - LO`` may
    also admit floats a little below it (down to half an ulp of ``b / BPO``, which is at most
    2**-13), so bisect over float32 values in that range (ordered by their bit patterns).
    """
    lo = torch.tensor(LOG2_LO, dtype=torch.float32)
    edge = torch.tensor(b / BINS_PER_OCTAVE, dtype=torch.float32)

    def holds(key: int) -> bool:
        return bool((_from_key(key) - lo) >= edge)

    hi_key = _to_key(b / BINS_PER_OCTAVE + LOG2_LO)  # exact in float32: satisfies the predicate
    lo_key = _to_key(b / BINS_PER_OCTAVE + LOG2_LO - 2.0**-12)  # fails it
    while hi_key - lo_key > 1:
        mid = (hi_key + lo_key) // 2
        if holds(mid):
            hi_key = mid
        else:
            lo_key = mid
    return float(_from_key(hi_key))


def _to_key(x: float) -> int:
    """A float32's position in value order (an int, monotone in x; -0.0 and 0.0 share 0)."""
    bits = int(torch.tensor(x, dtype=torch.float32).view(torch.int32))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def _from_key(key: int) -> torch.Tensor:
    bits = key if key >= 0 else (-key) | -0x80000000
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


@torch.no_grad()
def graft(base: torch.Tensor, expert: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w0 + M * (w_t - w0)``: the expert with its low-saliency edits reverted to the base."""
    return torch.where(mask, expert, base)
