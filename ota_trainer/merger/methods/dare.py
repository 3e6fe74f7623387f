"""DARE (Yu et al. 2024): drop each edit at random, rescale the rest, add them to the base."""

from __future__ import annotations

import zlib

from .base import LAMBDA, WEIGHT, MergeMethod, Param, drop_rate, in_unit

DROP_RATE = Param(
    "drop_rate", float, 0.5, "probability q of dropping each edit", per_model=True, check=drop_rate, varies=True
)
SEED = Param("seed", int, 0, "random seed (the result is deterministic given it)")


def mergekit_density(params: dict, where: str) -> dict:
    """mergekit's DARE ``density`` (the kept fraction) as our ``drop_rate = 1 - density``."""
    from ...errors import ConfigError

    if "density" not in params:
        return params
    if "drop_rate" in params:
        raise ConfigError(f"{where}: density (mergekit's kept fraction) and drop_rate (1 - density) both set; give one")
    density = Param("density", float, None, "", check=in_unit).coerce(params.pop("density"), where)
    params["drop_rate"] = 1.0 - density
    return params


def generators(seed: int, name: str, count: int):
    """One Bernoulli stream per tensor and expert, seeded by (seed, tensor name, expert index):
    the same draws whichever order tensors are merged in."""
    import torch

    return [
        torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + i) % 2**63)
        for i in range(count)
    ]


def dare_drop(d, q: float, g):
    """``d * B / (1 - q)`` with ``B ~ Bernoulli(1 - q)`` drawn from ``g`` (``d`` itself when ``q = 0``)."""
    import torch

    if q <= 0:
        return d
    keep = torch.rand(d.shape, generator=g) >= q
    return d * keep / (1.0 - q)


def dare_merge(base, deltas, weights, drop_rates, lam: float, gens):
    """``w0 + lam * sum_t c_t * d_t * B_t / (1 - q_t)``, ``B_t ~ Bernoulli(1 - q_t)``, float32."""
    import torch

    out = base.to(torch.float32).clone()
    for d, c, q, g in zip(deltas, weights, drop_rates, gens):
        if q <= 0:
            out.add_(d, alpha=lam * c)
            continue
        keep = torch.rand(d.shape, generator=g) >= q
        out.add_(d * keep, alpha=lam * c / (1.0 - q))
    return out


def merge_torch(job):
    import torch

    w0 = job.w0.float()  # the whole tensor: one Bernoulli stream per tensor and expert
    deltas = [torch.sub(e, w0) for e in job.experts]
    merged = dare_merge(
        w0,
        deltas,
        job.coefs,
        [p["drop_rate"] for p in job.model_params],
        job.params["lambda"],
        generators(job.params["seed"], job.name, len(job.experts)),
    )
    return job.finish(merged).to(job.out_dtype)


METHOD = MergeMethod(
    "dare",
    "DARE",
    "https://arxiv.org/abs/2311.03099",
    description="drop each edit with probability q (drop_rate), rescale by 1/(1-q): w0 + λ Σ c_t d̃_t",
    needs_base=True,
    needs_moments=False,
    params=(DROP_RATE, SEED, LAMBDA, WEIGHT),
    torch=merge_torch,
    translate=mergekit_density,
    order=60,
)
