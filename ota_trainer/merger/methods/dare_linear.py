"""Linear DARE (Yu et al. 2024; mergekit's ``dare_linear``): drop each task vector's edits at
random, rescale the kept ones, and add their weighted average to the base.

``density`` is the probability of keeping an edit (``1 - drop_rate`` of :mod:`.dare`), drawn
from dare's stream, kept edits rescaled by ``1 / density`` (see :mod:`.dare_ties`). The sum of
the task vectors is normalised by the sum of the weights (mergekit's ``normalize: true``): with
unit weights this is ``dare`` with ``lambda / T``.
"""

from __future__ import annotations

from .base import LAMBDA, NORMALIZE, WEIGHT, MergeMethod, weights_sum
from .dare import SEED
from .dare_ties import DENSITY, dare_rescale, merge_dared


def dare_linear_merge(base, deltas, keeps, weights, densities, lam: float, normalize=None):
    """``w0 + lam * sum_t c_t d_t B_t / density_t / sum_t c_t`` of float32 tensors (or row
    blocks, with the matching blocks of the keep masks ``B_t``); ``normalize: false`` (mergekit's
    default for ``dare_linear``) does not divide by ``sum_t c_t``."""
    import torch

    total = float(sum(weights)) if normalize is not False else 1.0
    if total == 0:
        raise ValueError("dare_linear merge: the model weights sum to zero")
    out = base.to(torch.float32).clone()
    for d, k, p, c in zip(deltas, keeps, densities, weights):
        out.add_(dare_rescale(d, k, p), alpha=lam * c / total)
    return out


def merge_torch(job):
    return merge_dared(job, dare_linear_merge)


METHOD = MergeMethod(
    "dare_linear",
    "Linear DARE",
    "https://arxiv.org/abs/2311.03099",
    description="keep each edit with probability density (B_t), rescale by 1/density: d̃_t = d_t B_t / density; "
    "w0 + λ Σ c_t d̃_t / Σ c_t",
    needs_base=True,
    needs_moments=False,
    params=(DENSITY, SEED, LAMBDA, WEIGHT, NORMALIZE),
    torch=merge_torch,
    check_recipe=weights_sum,
    order=62,
)
