"""Model Breadcrumbs (Davari & Belilovsky 2023): mask each task vector's largest edits
(outliers) and its smallest ones (noise), add the rest to the base by task arithmetic.

Selection, per tensor and task vector, by magnitude rank (exact, like our TIES trim): with
``N`` entries, ``k_in = round(density * N)`` edits are kept and ``k_out = round(gamma * N)``
dropped above them, ``k_out`` lowered to ``N - k_in`` when both do not fit (``density`` always
holds, as in mergekit). ``M = T(k_out + k_in) and not T(k_out)``, where ``T(k)`` is ``|d| >= the
k-th largest |d|`` (nothing for ``k = 0``): entries tied with an edge go with the larger
magnitudes, as TIES keeps its ties; so ties at the outlier edge are all dropped, ties at the
lower edge all kept. The paper masks per layer, mergekit per tensor (the authors' code per row).
"""

from __future__ import annotations

import math

from .base import LAMBDA, WEIGHT, MergeMethod, Param, drop_rate, in_unit

DENSITY = Param(
    "density",
    float,
    0.15,
    "fraction of each tensor's edits kept: the largest magnitudes below the gamma outliers",
    per_model=True,
    check=in_unit,
)
GAMMA = Param(
    "gamma",
    float,
    0.01,
    "fraction of each tensor's largest-magnitude edits dropped as outliers",
    per_model=True,
    check=drop_rate,
)


def breadcrumb_cuts(d, density: float, gamma: float) -> tuple[float, float]:
    """``(lo, hi)`` of a whole float32 task vector tensor: its edits with ``lo <= |d| < hi`` are kept."""
    from ...backends.torch.ops import kth_largest_abs

    n = d.numel()
    k_in = int(round(density * n))
    k_out = min(int(round(gamma * n)), n - k_in)
    hi = kth_largest_abs(d, k_out) if k_out > 0 else math.inf
    if k_in == 0:
        return math.inf, hi
    lo = kth_largest_abs(d, k_out + k_in) if k_out + k_in < n else -math.inf
    return lo, hi


def breadcrumbs_merge(base, deltas, weights, cuts, lam: float):
    """``w0 + lam * sum_t c_t d_t M_t`` with ``M_t = lo_t <= |d_t| < hi_t``, float32 (``deltas``
    may be row blocks: ``cuts`` come from the whole tensors)."""
    import torch

    out = base.to(torch.float32).clone()
    for d, c, (lo, hi) in zip(deltas, weights, cuts):
        a = d.abs()
        out.add_(d * ((a >= lo) & (a < hi)), alpha=lam * c)
    return out


def merge_torch(job):
    import torch

    mp = job.model_params
    w0 = job.w0.float()  # the ranks are per whole tensor
    cuts = [breadcrumb_cuts(torch.sub(e, w0), p["density"], p["gamma"]) for e, p in zip(job.experts, mp)]
    del w0

    def block(rows):
        w0 = job.w0[rows].float()
        return breadcrumbs_merge(
            w0, [torch.sub(e[rows], w0) for e in job.experts], job.coefs, cuts, job.params["lambda"]
        )

    return job.blockwise(block)


METHOD = MergeMethod(
    "breadcrumbs",
    "Model Breadcrumbs",
    "https://arxiv.org/abs/2312.06795",
    description="per tensor, drop the top-gamma magnitudes of d_t (outliers) and keep the next density fraction "
    "(mask M_t): w0 + λ Σ c_t d_t M_t",
    needs_base=True,
    needs_moments=False,
    params=(DENSITY, GAMMA, LAMBDA, WEIGHT),
    torch=merge_torch,
    order=63,
)
