"""Task arithmetic: add the scaled sum of the task vectors to the base (Ilharco et al. 2023)."""

from __future__ import annotations

from .base import LAMBDA, WEIGHT, MergeMethod


def task_arithmetic_merge(base, deltas, weights, lam: float):
    """``w0 + lam * sum_t c_t d_t``, float32."""
    import torch

    out = base.to(torch.float32).clone()
    for d, c in zip(deltas, weights):
        out.add_(d, alpha=lam * c)
    return out


def merge_torch(job):
    import torch

    def block(rows):
        w0 = job.w0[rows].float()
        return task_arithmetic_merge(w0, [torch.sub(e[rows], w0) for e in job.experts], job.coefs, job.params["lambda"])

    return job.blockwise(block)


METHOD = MergeMethod(
    "task_arithmetic",
    "Task arithmetic",
    "https://arxiv.org/abs/2212.04089",
    description="w0 + λ Σ c_t d_t",
    needs_base=True,
    needs_moments=False,
    params=(LAMBDA, WEIGHT),
    torch=merge_torch,
    order=30,
)
