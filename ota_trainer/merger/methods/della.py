"""DELLA (Deep et al. 2024, "DELLA-Merging"): MAGPRUNE, drop edits at random with probabilities
that fall with their magnitude rank and rescale the kept ones, then TIES's sign election and
mean of the agreeing edits.

MAGPRUNE, per task vector and per row of the tensor's ``(m, n)`` view (the paper ranks row-wise
and found it better than per tensor; the authors' code and mergekit do the same); a tensor whose
view has one column (1-D: norms, biases) is ranked as one row of all its entries:

- rank: ``r_i`` = the number of entries of the row with a smaller ``|d|`` (equal magnitudes share
  the lowest rank), ``rho_i = r_i / (n - 1)`` (``1/2`` for a row of one entry); ``|d|`` is the
  exact edit (the float64 difference of the stored weights: rounding to float32 would tie
  distinct edits);
- drop probability ``p_i = (1 - density) + epsilon * (1 - 2 rho_i)``: the keep probability
  ``1 - p_i`` runs linearly from ``density - epsilon`` (smallest) to ``density + epsilon``
  (largest magnitude). ``density`` and ``epsilon`` are mergekit's (``epsilon`` the half-width of
  the window; the DELLA authors' code takes the whole width, ``window_size = 2 epsilon``); both
  must keep the window in (0, 1];
- drop: ``B_i = u_i >= p_i`` with ``u`` dare's stream (one ``torch.rand`` of the whole tensor
  per tensor and expert, :func:`.dare.generators`), ``p`` computed in float64;
- rescale: ``d~_i = c_t d_i B_i / (1 - p_i)`` (the paper's rescaling; mergekit's default
  rescales to the L1 norm instead).

Then :func:`.ties.elect_and_sum` and ``w0 + lambda * tau``, as :mod:`.dare_ties`.
"""

from __future__ import annotations

from typing import Any

from .base import LAMBDA, WEIGHT, MergeMethod, Param, in_unit
from .dare import SEED, generators

DENSITY = Param(
    "density", float, 0.7, "mean probability of keeping each edit (MAGPRUNE's 1 - p)", per_model=True, check=in_unit
)
EPSILON = Param(
    "epsilon",
    float,
    0.15,
    "half-width of MAGPRUNE's keep-probability window: density - epsilon for a "
    "row's smallest edit to density + epsilon for its largest",
    per_model=True,
    check=lambda x: None if 0 <= x < 0.5 else "must be in [0, 0.5) (density ± epsilon must lie in (0, 1])",
)


def check_window(params: list[dict[str, Any]]) -> str | None:
    """Every expert's keep probabilities ``density ± epsilon`` lie in (0, 1]."""
    for i, p in enumerate(params):
        lo, hi = p["density"] - p["epsilon"], p["density"] + p["epsilon"]
        if lo <= 0 or hi > 1 + 1e-12:
            return (
                f"models[{i}]: the keep probabilities density ± epsilon = [{lo:g}, {hi:g}] must lie in (0, 1]; "
                f"lower epsilon (or move density)"
            )
    return None


def drop_probabilities(a, density: float, epsilon: float):
    """MAGPRUNE's drop probabilities (float64) of magnitudes ``a`` (``(rows, n)``), ranked per row."""
    import torch

    n = a.shape[1]
    if n == 1:
        rho = torch.full(a.shape, 0.5, dtype=torch.float64)
    else:
        ranks = torch.searchsorted(torch.sort(a, dim=1).values, a.contiguous(), side="left")  # entries strictly smaller
        rho = ranks.to(torch.float64) / (n - 1)
    return (1.0 - density) + epsilon * (1.0 - 2.0 * rho)


def della_merge(base, experts, draws, weights, densities, epsilons, lam: float):
    """DELLA of row blocks ``(rows, n)`` of the stored base and experts (whole rows: the ranks
    are per row), with the matching blocks of each expert's uniform draws ``u``:

    1. MAGPRUNE: ``d~_t = c_t d_t [u_t >= p_t] / (1 - p_t)`` (see the module docstring), the
       ranks from the exact edits (float64: the float32 ``d_t`` may round two of them to one value)
    2. elect: ``gamma = sign(sum_t d~_t)``
    3. disjoint mean: ``tau = sum_t d~_t [sign(d~_t) == gamma] / #{t: sign(d~_t) == gamma, d~_t != 0}``
    4. ``w0 + lam * tau``, float32
    """
    import torch

    from .ties import elect_and_sum

    w0 = base.float()
    pruned = []
    for e, u, c, k, eps in zip(experts, draws, weights, densities, epsilons):
        p = drop_probabilities(torch.sub(e.double(), base.double()).abs_(), k, eps)
        pruned.append(torch.sub(e, w0) * (u >= p) / (1.0 - p).to(torch.float32) * c)
        del p
    total, count = elect_and_sum(torch.stack(pruned))
    return w0 + lam * total / count


def merge_torch(job):
    import torch

    mp = job.model_params
    densities, epsilons = [p["density"] for p in mp], [p["epsilon"] for p in mp]
    gens = generators(job.params["seed"], job.name, len(job.experts))
    draws = [
        torch.rand((job.m, job.n), generator=g) for g in gens
    ]  # the whole tensor: one stream per tensor and expert
    lam = job.params["lambda"]
    if job.n == 1:  # one column (1-D tensors): one row of all its entries
        merged = della_merge(
            job.w0.reshape(1, -1),
            [e.reshape(1, -1) for e in job.experts],
            [u.reshape(1, -1) for u in draws],
            job.coefs,
            densities,
            epsilons,
            lam,
        )
        return job.finish(merged.reshape(job.m, job.n)).to(job.out_dtype)
    return job.blockwise(
        lambda rows: della_merge(
            job.w0[rows], [e[rows] for e in job.experts], [u[rows] for u in draws], job.coefs, densities, epsilons, lam
        )
    )


METHOD = MergeMethod(
    "della",
    "DELLA",
    "https://arxiv.org/abs/2406.11617",
    description="per row, keep each edit with probability k rising linearly with its magnitude rank from density - ε "
    "to density + ε (B_t), rescale by 1/k: d̃_t = c_t d_t B_t / k; elect a sign per entry, mean of the "
    "agreeing d̃_t, × λ",
    needs_base=True,
    needs_moments=False,
    params=(DENSITY, EPSILON, SEED, LAMBDA, WEIGHT),
    torch=merge_torch,
    check_recipe=check_window,
    order=64,
)
