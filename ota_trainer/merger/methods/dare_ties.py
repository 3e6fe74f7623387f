"""DARE-TIES (Yu et al. 2024, DARE as the trim step of Yadav et al. 2023's TIES): drop each
task vector's edits at random, rescale the kept ones, then elect a sign per entry and average
the edits that agree with it.

Conventions (mergekit's parameter names, our semantics):

- ``density`` is the probability of KEEPING an edit (mergekit's name; :mod:`.dare`'s
  ``drop_rate`` is ``1 - density``). The draws are dare's stream: one ``torch.rand`` of the
  whole tensor per tensor and expert from :func:`.dare.generators`, an edit kept where the draw
  is ``>= 1 - density``; kept edits are rescaled by ``1 / density`` (the paper's ``1/(1-p)``;
  mergekit instead rescales to the task vector's L1 norm). ``density = 1`` keeps everything.
- The sign election and the mean of the agreeing edits are :func:`.ties.elect_and_sum`'s
  (weights applied before the election; the mean divides by the number of agreeing edits, as
  our ``ties``; mergekit's ``dare_ties`` sums them by default: ``normalize: false`` here does
  that, ``normalize: true`` divides by the agreeing experts' weights, as mergekit's).
"""

from __future__ import annotations

from .base import LAMBDA, NORMALIZE, WEIGHT, MergeMethod, Param, in_unit
from .dare import SEED, generators

DENSITY = Param(
    "density",
    float,
    0.5,
    "probability of keeping each edit (DARE's 1 - drop rate); kept edits are rescaled by 1/density",
    per_model=True,
    check=in_unit,
    varies=True,
)


def dare_keeps(job, densities):
    """Each expert's DARE keep mask of the whole ``(m, n)`` tensor (bool), or None where
    ``density >= 1`` (every edit kept, nothing drawn): ``u >= 1 - density`` with ``u`` one
    ``torch.rand`` per tensor and expert from :func:`.dare.generators` (dare's stream)."""
    import torch

    gens = generators(job.params["seed"], job.name, len(job.experts))
    return [None if p >= 1 else torch.rand((job.m, job.n), generator=g) >= 1.0 - p for p, g in zip(densities, gens)]


def dare_rescale(d, keep, density: float):
    """``d * B / density`` (``d`` itself where nothing was drawn), float32."""
    return d if keep is None else d * keep / density


def dare_ties_merge(base, deltas, keeps, weights, densities, lam: float, normalize=None):
    """DARE-TIES of float32 tensors (or row blocks of them, with the matching blocks of ``keeps``):

    1. drop and rescale: ``d~_t = c_t * d_t * B_t / density_t``, ``B_t`` the keep mask
    2. elect: ``gamma = sign(sum_t d~_t)``
    3. disjoint mean: ``tau = sum_t d~_t [sign(d~_t) == gamma] / #{t: sign(d~_t) == gamma, d~_t != 0}``
       (``normalize``: as :func:`.ties.ties_merge`)
    4. ``w0 + lam * tau``
    """
    import torch

    from .ties import elect_and_sum

    dropped = torch.stack(
        [dare_rescale(d, k, p) * c for d, k, p, c in zip(deltas, keeps, densities, weights)]
    )  # (T, ...)
    total, count = elect_and_sum(dropped, weights, normalize)
    return base.to(torch.float32) + lam * total / count


def merge_dared(job, combine):
    """Every expert's edits DARE-dropped (the masks drawn on the whole tensor, :func:`dare_keeps`),
    then ``combine(w0, deltas, keeps, coefs, densities, lam, normalize)`` row block by row block."""
    import torch

    densities = [p["density"] for p in job.model_params]
    keeps = dare_keeps(job, densities)  # drawn on the whole tensor; the arithmetic is per entry

    def block(rows):
        w0 = job.w0[rows].float()
        deltas = [torch.sub(e[rows], w0) for e in job.experts]
        blocks = [k if k is None else k[rows] for k in keeps]
        return combine(w0, deltas, blocks, job.coefs, densities, job.params["lambda"], job.params["normalize"])

    return job.blockwise(block)


def merge_torch(job):
    return merge_dared(job, dare_ties_merge)


METHOD = MergeMethod(
    "dare_ties",
    "DARE-TIES",
    "https://arxiv.org/abs/2311.03099",
    description="keep each edit with probability density (B_t), rescale by 1/density: d̃_t = c_t d_t B_t / density; "
    "elect a sign per entry, mean of the agreeing d̃_t, × λ",
    needs_base=True,
    needs_moments=False,
    params=(DENSITY, SEED, LAMBDA, WEIGHT, NORMALIZE),
    torch=merge_torch,
    order=61,
)
