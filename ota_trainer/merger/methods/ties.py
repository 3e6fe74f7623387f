"""TIES-merging (Yadav et al. 2023): trim each task vector, elect a sign per entry, average the
edits that agree with it."""

from __future__ import annotations

from .base import LAMBDA, NORMALIZE, WEIGHT, MergeMethod, Param, in_unit, weight_divisor

DENSITY = Param(
    "density",
    float,
    0.2,
    "fraction of each tensor's edits kept by magnitude",
    per_model=True,
    check=in_unit,
    varies=True,
)


def ties_merge(base, deltas, weights, densities, lam: float, *, cuts=None, normalize=None):
    """TIES of float32 tensors:

    1. trim: ``d_t' = c_t * d_t * topk(|d_t|, density_t)``
    2. elect: ``gamma = sign(sum_t d_t')``
    3. disjoint mean: ``tau = sum_t d_t' [sign(d_t') == gamma] / #{t: sign(d_t') == gamma, d_t' != 0}``
       (``normalize``: true divides by the agreeing experts' ``sum_t c_t`` instead, mergekit's
       rule; false does not divide)
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
    total, count = elect_and_sum(trimmed, weights, normalize)
    return base.to(torch.float32) + lam * total / count


def elect_and_sum(trimmed, weights=None, normalize=None):
    """Sign election over dim 0 of stacked task vectors ``(T, ...)``: ``gamma = sign(sum_t d_t)``,
    then the sum of the edits agreeing with it and its divisor: their count (at least 1), or
    with ``normalize`` true the agreeing experts' ``sum_t c_t`` (mergekit), false 1."""
    import torch

    elected = torch.sign(trimmed.sum(dim=0))  # (...)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # (T, ...)
    total = (trimmed * agree).sum(dim=0)
    if normalize is None:
        return total, agree.sum(dim=0).clamp_(min=1)
    return total, weight_divisor(weights, agree) if normalize else torch.tensor(1.0)


def merge_torch(job):
    import torch

    from ...backends.native import MAX_TIES_EXPERTS
    from ...backends.torch.ops import magnitude_cut

    densities = [p.get("density") for p in job.model_params]
    lam = job.params["lambda"]
    if job.native_ops is not None and len(job.experts) <= MAX_TIES_EXPERTS and job.params["normalize"] is None:
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
        deltas = [torch.sub(e[rows], w0) for e in job.experts]
        return ties_merge(w0, deltas, job.coefs, densities, lam, cuts=cuts, normalize=job.params["normalize"])

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

    if recipe.method_parameters().get("normalize") is not None:
        return "normalize is set (mergekit's rule: PyTorch)"
    return None if len(inputs.experts) <= MAX_TIES_EXPERTS else f"more than {MAX_TIES_EXPERTS} experts"


METHOD = MergeMethod(
    "ties",
    "TIES",
    "https://arxiv.org/abs/2306.01708",
    description="trim each d_t to its top-density |d| per tensor, elect a sign per entry, "
    "mean of the agreeing edits, × λ",
    needs_base=True,
    needs_moments=False,
    params=(DENSITY, LAMBDA, WEIGHT, NORMALIZE),
    torch=merge_torch,
    native=merge_native,
    native_covers=native_covers,
    order=50,
)
