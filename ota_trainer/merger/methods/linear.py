"""Linear: a weighted average of the experts' weights (Wortsman et al., model soups)."""

from __future__ import annotations

from .base import NORMALIZE, WEIGHT, MergeMethod, weights_sum


def linear_merge(experts, weights, normalize=None):
    """``sum_t c_t w_t / sum_t c_t`` (plain averaging when every ``c_t = 1``), float32;
    ``normalize: false`` (mergekit's) is ``sum_t c_t w_t``."""
    import torch

    total = float(sum(weights)) if normalize is not False else 1.0
    if total == 0:
        raise ValueError("linear merge: the model weights sum to zero")
    out = torch.zeros_like(experts[0], dtype=torch.float32)
    for w, c in zip(experts, weights):
        out.add_(w, alpha=c / total)
    return out


def merge_torch(job):
    return job.blockwise(lambda rows: linear_merge([e[rows] for e in job.experts], job.coefs, job.params["normalize"]))


METHOD = MergeMethod(
    "linear",
    "Linear (weight averaging)",
    "https://arxiv.org/abs/2203.05482",
    description="Σ c_t w_t / Σ c_t",
    needs_base=False,
    needs_moments=False,
    params=(WEIGHT, NORMALIZE),
    torch=merge_torch,
    check_recipe=weights_sum,
    order=40,
)
