"""TIES-merging (Yadav et al. 2023): trim each task vector, elect a sign per entry, average the
edits that agree with it."""

from __future__ import annotations

from .base import LAMBDA, WEIGHT, MergeMethod, Param, in_unit

DENSITY = Param(
    "density", float, 0.2, "fraction of each tensor's edits kept by magnitude", per_model=True, check=in_unit
)


def ties_merge(base, deltas, weights, densities, lam: float, *, cuts=None):
    """TIES of float32 tensors:

    1. trim: ``d_t' = c_t * d_t * topk(|d_t|, density_t)``
    2. elect: ``gamma = sign(sum_t d_t')``
    3. disjoint mean: ``tau = sum_t d_t' [sign(d_t') == gamma] / #{t: sign(d_t') == gamma, d_t' != 0}``
    4. ``w0 + lam * tau``

    ``cuts``: each task vector's trim threshold computed on its whole tensor
    (:func:`~ota_trainer.backends.torch.ops.magnitude_cut`), when ``deltas`` are blocks of it.
    """
    import torch

    from ...backends.torch.ops import topk_mask

    cuts = cuts if cuts is not None else [None] * len(deltas)
    trimmed = torch.stack(
        [d * topk_mask(d, p, k) * c for d, c, p, k in zip(deltas, weights, densities, cuts)]
    )  # (T, ...)
    total, count = elect_and_sum(trimmed)
    return base.to(torch.float32) + lam * total / count


def elect_and_sum(trimmed):
    """Sign election over dim 0 of stacked task vectors ``(T, ...)``: ``gamma = sign(sum_t d_t)``,
    then the sum of the edits agreeing with it and their count (at least 1)."""
    import torch

    elected = torch.sign(trimmed.sum(dim=0))  # (...)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # (T, ...)
    return (trimmed * agree).sum(dim=0), agree.sum(dim=0).clamp_(min=1)


def merge_torch(job):
    import torch

    from ...backends.native import MAX_TIES_EXPERTS
    from ...backends.torch.ops import magnitude_cut

    densities = [p.get("density") for p in job.model_params]
    lam = job.params["lambda"]
    if job.native_ops is not None and len(job.experts) <= MAX_TIES_EXPERTS:
        ops = job.native_ops
        out, finite = ops.ties_merge(
            job.w0,
            job.experts,
            ops.magnitude_cuts(job.w0, job.experts, densities),
            job.coefs,
            lam,
            out_dtype=job.out_dtype,
            out=job.out(),
        )
        return out if finite else job.non_finite()
    w0 = job.w0.float()  # trim thresholds are per whole tensor
    cuts = [magnitude_cut(torch.sub(e, w0), d) for e, d in zip(job.experts, densities)]
    del w0

    def block(rows):
        w0 = job.w0[rows].float()
        return ties_merge(w0, [torch.sub(e[rows], w0) for e in job.experts], job.coefs, densities, lam, cuts=cuts)

    return job.blockwise(block)


def merge_native(job) -> bool:
    from ...backends import native

    numel = job.m * job.n
    cuts = native.raw_magnitude_cuts(
        job.w0[0], job.w0[1], numel, job.experts, [p.get("density") for p in job.model_params], job.threads
    )
    return native.raw_ties_merge(
        job.w0[0],
        job.w0[1],
        numel,
        job.experts,
        cuts,
        job.coefs,
        job.params["lambda"],
        job.out,
        job.out_code,
        job.threads,
    )


def native_covers(recipe, inputs) -> str | None:
    from ...backends.native import MAX_TIES_EXPERTS

    return None if len(inputs.experts) <= MAX_TIES_EXPERTS else f"more than {MAX_TIES_EXPERTS} experts"


METHOD = MergeMethod(
    "ties",
    "TIES",
    "https://arxiv.org/abs/2306.01708",
    description="trim each d_t to its top-density |d| per tensor, elect a sign per entry, "
    "mean of the agreeing edits, × λ",
    needs_base=True,
    needs_moments=False,
    params=(DENSITY, LAMBDA, WEIGHT),
    torch=merge_torch,
    native=merge_native,
    native_covers=native_covers,
    order=50,
)
