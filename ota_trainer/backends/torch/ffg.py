"""Fast Fisher Grafting (FFG): revert low-saliency fine-tuning edits (method.md §3).

Saliency of edit ``d_t = w_t - w0`` with second moment ``v_t``::

    s_t = v_t * d_t**2            (score="fisher", the paper's FFG)
    s_t = d_t**2                  (score="magnitude", the paper's ablation)

Keep mask ``M_t = s_t >= theta_t``; grafted weights ``w0 + M_t * d_t``.

Scores span hundreds of binary orders of magnitude and underflow float32 when squared, so
they are computed in float64, as ``((d * d) * v)`` (rank-one ``v = outer(a, b)``:
``((d * d) * a_i) * b_j``) from float32 ``d`` and ``v``: for any finite float32 inputs the
result lies in [2**-596, 2**384], far inside float64's range, so nothing underflows, and the
fixed order of the multiplications makes the score the same bits wherever it is computed
(here or in the native kernel, :mod:`ota_trainer.backends.native`).

A *global* threshold for a target density (fraction of an expert's entries kept, over all its
parameters) is found with a streaming histogram (:class:`SaliencyHistogram`) of the scores'
bit patterns: a non-negative float64's bits order like its value, so ``bits >> 42`` (its 11
exponent bits and top 10 mantissa bits) is a bin index that splits every octave into 1024
bins (each under 0.1% wide) with no logarithm. One pass counts, then the bin edge whose kept
count is nearest the target is chosen; the edge is itself a float64, so the merge pass's mask
``s >= edge`` is exactly "bin >= b" and the achieved density is exactly the count the
histogram predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..thresholds import BIN_SHIFT, KEEP_ALL, N_BINS, SCORES, Threshold, bin_edge, density_bin, share_bin

__all__ = [
    "SCORES",
    "saliency",
    "Score",
    "SaliencyHistogram",
    "Threshold",
    "KEEP_ALL",
    "per_tensor_threshold",
    "keep_mask",
    "bin_edge",
    "graft",
]

_BIN_MASK = N_BINS - 1  # also maps -0.0 (sign bit set) to bin 0 with the zeros
_CHUNK = 1 << 19  # elements per chunk when binning: temporaries stay in cache
_ONES = torch.ones(_CHUNK, dtype=torch.int64)


@torch.no_grad()
def saliency(
    delta: torch.Tensor,
    v: torch.Tensor | None,
    score: str = "fisher",
    *,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``s = v * d**2`` (fisher) or ``s = d**2`` (magnitude) in float64, ``delta``'s shape.

    For a rank-one ``v = outer(a, b)`` of ``delta`` viewed as an (m, n) matrix give
    ``factors = (a, b)`` (float64, shapes (m,) and (n,)) instead of ``v``: ``v`` is never
    materialised. Products are taken in the order ``((d * d) * a_i) * b_j`` / ``(d * d) * v``.
    """
    s = delta.to(torch.float64).square_()
    if score == "magnitude":
        return s
    if score != "fisher":
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    if factors is not None:
        a, b = factors
        mat = s.view(a.numel(), b.numel())  # (m, n)
        mat.mul_(a[:, None]).mul_(b[None, :])
        return s
    if v is None:
        raise ValueError("fisher saliency needs the second moment v")
    return s.mul_(v.to(torch.float64))


@dataclass
class Score:
    """How one expert's FFG saliency is computed for one tensor in its (m, n) view, prepared
    once per tensor and applied block by block: ``kind`` is "rank1" (``a``, ``b``: float64
    factors of ``v``, shapes (m,) and (n,)), "full" (``v``: float32 (m, n)) or "magnitude"."""

    kind: str
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @classmethod
    def rank1(cls, a: torch.Tensor, b: torch.Tensor) -> Score:
        return cls("rank1", a=a.to(torch.float64), b=b.to(torch.float64))

    def block(self, delta: torch.Tensor, rows: slice) -> torch.Tensor:
        """float64 saliencies of the edits ``delta`` of rows ``rows``."""
        if self.kind == "magnitude":
            return saliency(delta, None, "magnitude")
        if self.kind == "rank1":
            return saliency(delta, None, factors=(self.a[rows], self.b))
        return saliency(delta, self.v[rows])


def _bin_index(s: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each float64 score (int64): ``bits >> 42``. Bin 0 holds the zeros (no
    non-zero score from float32 inputs is that small); +inf and NaN land in the top bins."""
    return (s.to(torch.float64).contiguous().view(torch.int64) >> BIN_SHIFT) & _BIN_MASK


class SaliencyHistogram:
    """Streaming histogram of one expert's float64 saliencies over all its parameters.

    >>> h = SaliencyHistogram()
    >>> h.add(saliency(d, v))              # once per tensor
    >>> thr = h.threshold_for_density(0.4)  # global threshold

    ``counts`` may also be filled by the native kernel (same bins) and ``total`` raised by hand.
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(N_BINS, dtype=torch.int64)  # counts[0]: zero saliency
        self.total = 0

    @torch.no_grad()
    def add(self, s: torch.Tensor) -> None:
        """Count one tensor's float64 saliencies."""
        flat = s.reshape(-1)
        self.total += flat.numel()
        for start in range(0, flat.numel(), _CHUNK):
            idx = _bin_index(flat[start : start + _CHUNK])
            # scatter_add into the running counts: as fast as bincount per element, without
            # allocating and adding a 2**21-bin histogram per call
            self.counts.scatter_add_(0, idx, _ONES[: idx.numel()])

    @property
    def zeros(self) -> int:
        """Entries with zero saliency (they are never kept by a positive threshold)."""
        return int(self.counts[0])

    def threshold_for_density(self, density: float) -> Threshold:
        """The bin-edge threshold whose kept fraction is nearest ``density``."""
        bins = torch.nonzero(self.counts).reshape(-1)
        b = density_bin(bins.tolist(), self.counts[bins].tolist(), self.total, density)
        return KEEP_ALL if b is None else Threshold.at_bin(b)

    def threshold_for_share(self, share: float) -> Threshold:
        """The bin-edge threshold keeping the fewest top entries that hold ``share`` of the
        expert's total saliency ``sum(s)`` (a density rule that adapts to each expert;
        :func:`~ota_trainer.backends.thresholds.share_bin`, the native backend's rule too)."""
        bins = torch.nonzero(self.counts).flatten()
        b = share_bin(bins.tolist(), self.counts[bins].tolist(), share)
        return KEEP_ALL if b is None else Threshold.at_bin(b)

    def kept(self, threshold: Threshold) -> int:
        """Entries a threshold keeps (exact for histogram thresholds)."""
        if threshold.keeps_all:
            return self.total
        b = (
            threshold.bin
            if threshold.bin is not None
            else int(_bin_index(torch.tensor([threshold.value], dtype=torch.float64)))
        )
        return int(self.counts[b:].sum())


@torch.no_grad()
def per_tensor_threshold(s: torch.Tensor, density: float) -> Threshold:
    """Threshold keeping the top ``density`` fraction of one tensor's entries (ablation)."""
    n = s.numel()
    k = int(round(density * n))
    if k >= n:
        return KEEP_ALL
    if k <= 0:
        return Threshold(math.inf)
    kth = torch.kthvalue(s.reshape(-1).to(torch.float64), n - k + 1).values.item()  # k-th largest
    return KEEP_ALL if kth <= 0 else Threshold(kth)


@torch.no_grad()
def keep_mask(s: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """``M = s >= theta`` as a bool tensor of ``s``'s shape."""
    if threshold.keeps_all:
        return torch.ones_like(s, dtype=torch.bool)
    return s >= threshold.value


@torch.no_grad()
def graft(base: torch.Tensor, expert: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w0 + M * (w_t - w0)``: the expert with its low-saliency edits reverted to the base."""
    return torch.where(mask, expert, base)
