"""Task arithmetic: add the scaled sum of the task vectors to the base (Ilharco et al. 2023)."""

from __future__ import annotations

from .base import LAMBDA, NORMALIZE, WEIGHT, MergeMethod, weight_divisor


def task_arithmetic_merge(base, deltas, weights, lam: float, normalize=None):
    """``w0 + lam * sum_t c_t d_t``, float32 (``normalize`` true: the sum divided by ``sum_t c_t``,
    mergekit's ``normalize: true``)."""
    import torch

    scale = lam / float(weight_divisor(weights)) if normalize else lam
    out = base.to(torch.float32).clone()
    for d, c in zip(deltas, weights):
        out.add_(d, alpha=scale * c)
    return out


def merge_torch(job):
    import torch

    def block(rows):
        w0 = job.w0[rows].float()
        deltas = [torch.sub(e[rows], w0) for e in job.experts]
        return task_arithmetic_merge(w0, deltas, job.coefs, job.params["lambda"], job.params["normalize"])

    return job.blockwise(block)


METHOD = MergeMethod(
    "task_arithmetic",
    "Task arithmetic",
    "https://arxiv.org/abs/2212.04089",
    description="w0 + λ Σ c_t d_t",
    needs_base=True,
    needs_moments=False,
    params=(LAMBDA, WEIGHT, NORMALIZE),
    torch=merge_torch,
    order=30,
)
