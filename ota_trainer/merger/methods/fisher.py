"""Diagonal Fisher merging (Matena & Raffel 2022): weights averaged by their curvature, no base."""

from __future__ import annotations

from .base import BIAS_CORRECTION, EPSILON, POSITIVE_WEIGHT, MergeMethod


def fisher_merge(experts, moments, weights, epsilon: float):
    """``sum_t c_t (v_t + eps) w_t / sum_t c_t (v_t + eps)``, float32."""
    import torch

    num = torch.zeros_like(experts[0], dtype=torch.float32)
    den = torch.zeros_like(experts[0], dtype=torch.float32)
    for w, v, c in zip(experts, moments, weights):
        f = (v + epsilon).mul_(c)
        num.addcmul_(f, w)
        den.add_(f)
    return num.div_(den)


def merge_torch(job):
    import torch

    curvatures = job.curvatures(1.0, "none")

    def block(rows):
        ws = [e[rows].float() for e in job.experts]
        v = [c.weights(rows, 0.0) for c in curvatures]  # None: uniform curvature
        v = [torch.ones_like(ws[0]) if x is None else x for x in v]
        return fisher_merge(ws, v, job.coefs, job.params["epsilon"])

    return job.blockwise(block)


METHOD = MergeMethod(
    "fisher",
    "Fisher merging",
    "https://arxiv.org/abs/2111.09832",
    description="Σ c_t (v_t + ε) w_t / Σ c_t (v_t + ε)",
    needs_base=False,
    needs_moments=True,
    params=(EPSILON, BIAS_CORRECTION, POSITIVE_WEIGHT),
    torch=merge_torch,
    order=20,
)
