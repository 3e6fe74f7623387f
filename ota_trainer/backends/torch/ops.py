"""Tensor helpers the methods' PyTorch math shares (each method's own formula lives in its file,
:mod:`ota_trainer.merger.methods`): exact magnitude selection (TIES-style trimming), curvature
weights ``P = v**p`` prepared per tensor, OTA's running sums.

Pure tensor-in / tensor-out functions, no I/O. Inputs are float32; callers cast the result
back to the output dtype. Notation: ``w0`` base, ``w_t`` expert t, ``d_t = w_t - w0``,
``v_t`` second moment, ``M_t`` FFG keep mask, ``c_t`` per-expert weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "OTAAccumulator",
    "Curvature",
    "topk_mask",
    "magnitude_cut",
    "kth_largest_abs",
]


@torch.no_grad()
def magnitude_cut(x: torch.Tensor, density: float) -> float:
    """The ``round(density * numel)``-th largest ``|x|`` (``-inf``: keep all, ``inf``: keep none)."""
    n = x.numel()
    k = int(round(density * n))
    if k >= n:
        return -math.inf
    if k <= 0:
        return math.inf
    return kth_largest_abs(x, k)


@torch.no_grad()
def kth_largest_abs(x: torch.Tensor, k: int) -> float:
    """The k-th largest ``|x|`` of a float32 tensor, exactly (what ``torch.kthvalue`` gives).

    A two-level radix select on the bit patterns of ``|x|`` (for non-negative floats the int32
    pattern orders like the value): count the top 16 bits, find the bucket holding the k-th
    largest, then count the low 16 bits inside that bucket. Four passes over the tensor instead
    of a selection algorithm, ~10x faster on CPU.
    """
    bits = x.to(torch.float32).abs().reshape(-1).view(torch.int32)  # (N,), sign bit clear
    hi = bits >> 16
    bucket, rank = _select_from_top(torch.bincount(hi, minlength=1 << 15), k)
    low = torch.bincount(bits[hi == bucket] & 0xFFFF, minlength=1 << 16)
    lo, _ = _select_from_top(low, rank)
    return float(torch.tensor((bucket << 16) | lo, dtype=torch.int32).view(torch.float32))


def _select_from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest element, its rank counted from the top within that bin)."""
    from_top = torch.cumsum(torch.flip(counts, [0]), 0)  # from_top[j]: elements in bins >= len-1-j
    j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))  # first j with from_top[j] >= k
    b = counts.numel() - 1 - j
    above = int(from_top[j]) - int(counts[b])
    return b, k - above


@torch.no_grad()
def topk_mask(x: torch.Tensor, density: float, cut: float | None = None) -> torch.Tensor:
    """Bool mask of the ``round(density * numel)`` entries of largest ``|x|`` (ties kept).

    ``cut`` (from :func:`magnitude_cut` on the whole tensor) applies the same rule to a block of it.
    """
    cut = magnitude_cut(x, density) if cut is None else cut
    if cut == -math.inf:
        return torch.ones_like(x, dtype=torch.bool)
    return x.abs() >= cut


def _power(x: torch.Tensor, power: float) -> torch.Tensor:
    """``x ** power`` (a fresh tensor), with the correctly rounded sqrt for the paper's ``p = 1/2``."""
    return _sqrt(x) if power == 0.5 else x.pow(power) if power != 1.0 else x.clone()


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (PyTorch's vectorised one may be off by an ulp; the
    native kernel's ``sqrtf`` is exact, and both must agree): through float64, which is exact."""
    return x.to(torch.float64).sqrt_().to(torch.float32)


def _check_normalise(normalise: str) -> None:
    if normalise not in ("none", "mean"):
        raise ValueError(f"unknown normalise {normalise!r}; choose 'none' or 'mean'")


@dataclass
class Curvature:
    """``P_t = v_t ** power`` of one whole tensor in its (m, n) view, optionally divided by its
    mean (``normalise="mean"``), prepared once per tensor and read block by block.

    Rank one (``pa``, ``pb``): ``P = outer(pa, pb)`` with ``pa = a**p / mean``, ``pb = b**p``
    (``mean(v**p) = mean(a**p) * mean(b**p)``: O(m + n)). Full (``v``): ``P = sqrt(v)`` when
    ``sqrt`` else ``v`` (already raised to any other power), then divided by ``div`` when > 0.
    Neither: uniform curvature (``P = 1``).
    """

    pa: torch.Tensor | None = None
    pb: torch.Tensor | None = None
    v: torch.Tensor | None = None
    sqrt: bool = False
    div: float = 0.0

    @classmethod
    def rank1(cls, a: torch.Tensor, b: torch.Tensor, power: float, normalise: str) -> Curvature:
        _check_normalise(normalise)
        pa, pb = _power(a.to(torch.float32), power), _power(b.to(torch.float32), power)
        if normalise == "mean":
            mean = pa.mean() * pb.mean()
            if mean > 0:
                pa.div_(mean)
        return cls(pa=pa, pb=pb)

    @classmethod
    def full(cls, v: torch.Tensor, power: float, normalise: str) -> Curvature:
        _check_normalise(normalise)
        v = v.to(torch.float32)
        src = v if power in (0.5, 1.0) else v.pow(power)
        div = 0.0
        if normalise == "mean":
            mean = float((_sqrt(src) if power == 0.5 else src).mean())
            div = mean if mean > 0 else 0.0
        return cls(v=src, sqrt=power == 0.5, div=div)

    def weights(self, rows: slice, epsilon: float) -> torch.Tensor | None:
        """``P + eps`` of a row block (a fresh float32 tensor), or None for uniform curvature."""
        if self.pa is not None:
            return torch.outer(self.pa[rows], self.pb).add_(epsilon)
        if self.v is None:
            return None
        p = _sqrt(self.v[rows]) if self.sqrt else self.v[rows].clone()
        if self.div > 0:
            p.div_(self.div)
        return p.add_(epsilon)


_SMALLEST_SUBNORMAL = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23  # 2**-149


class OTAAccumulator:
    """Running sums of OTA aggregation, one expert at a time (so peak memory does not grow with T).

    ``num = sum_t W_t d_t`` and ``den = sum_t W_t`` with ``W_t = c_t (P_t + eps) M_t``;
    :meth:`result` gives ``w0 + num / den`` (``w0`` where ``den == 0``).
    """

    def __init__(self, base: torch.Tensor, *, epsilon: float = 1e-26):
        self.base = base
        self.epsilon = epsilon
        self.num: torch.Tensor | None = None  # allocated by the first expert's product
        self.den: torch.Tensor | None = None

    @torch.no_grad()
    def add(
        self, delta: torch.Tensor, weights: torch.Tensor | None, mask: torch.Tensor | None, weight: float = 1.0
    ) -> None:
        """Add expert t: task vector ``d_t``, ``P_t + eps`` (None: uniform, a fresh tensor this call
        may edit otherwise; see :meth:`Curvature.weights`), keep mask ``M_t`` (None: all)."""
        w = weights if weights is not None else torch.full(self.base.shape, 1.0 + self.epsilon, dtype=torch.float32)
        if mask is not None:
            w.mul_(mask)
        if weight != 1.0:
            w.mul_(weight)
        if self.num is None:
            self.num, self.den = w * delta, w  # W_t is this call's own tensor: kept as the running sum
        else:
            self.num.addcmul_(w, delta)
            self.den.add_(w)

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        """``w0 + num / den``, and ``w0`` where ``den == 0``."""
        if self.num is None:
            return self.base.to(torch.float32).clone()
        # Weights are non-negative, so num == 0 wherever den == 0. Raising den to the smallest
        # positive float32 changes only those zeros (every positive float32 is >= it): 0 / tiny
        # = 0 there leaves w0, and everything else is divided exactly as before.
        self.den.clamp_(min=_SMALLEST_SUBNORMAL)
        return torch.addcdiv(self.base.to(torch.float32), self.num, self.den)
