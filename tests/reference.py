"""Independent reference merges on fully loaded state dicts, with plain tensor ops.

Deliberately does not call ota_trainer's own math helpers: the engine is checked against this.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def state(folder) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float64) for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}


def moments(folder, *, bias_correction=True) -> dict[str, torch.Tensor]:
    path = Path(folder) / "ota" / "moments.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["ota_moments"])
        out = {}
        for name, p in meta["parameters"].items():
            shape = p["shape"]
            if p["stored"] == "full":
                v = f.get_tensor(name).to(torch.float64)
            else:
                r = f.get_tensor(name + "::row").to(torch.float64)
                c = f.get_tensor(name + "::col").to(torch.float64)
                v = (r[:, None] * c[None, :] / r.sum()).reshape(shape)
            if bias_correction:
                v = v / (1 - meta["beta2"] ** meta["step"])
            out[name] = v
    return out


def ffg_masks_absolute(base, experts, vs, theta):
    return [{n: vs[t][n] * (experts[t][n] - base[n]) ** 2 >= theta for n in base} for t in range(len(experts))]


def ffg_masks_density(base, experts, vs, density, score="fisher"):
    """Exact global top-k by saliency over all of each expert's entries."""
    masks = []
    for t in range(len(experts)):
        s = {n: (vs[t][n] if score == "fisher" else 1.0) * (experts[t][n] - base[n]) ** 2 for n in base}
        flat = torch.cat([x.reshape(-1) for x in s.values()])
        k = round(density * flat.numel())
        theta = torch.sort(flat, descending=True).values[k - 1]
        masks.append({n: s[n] >= theta for n in base})
    return masks


def ffg_masks_share(base, experts, vs, share):
    """Exact: each expert keeps its fewest top entries by saliency whose sum holds ``share`` of its total."""
    masks = []
    for t in range(len(experts)):
        s = {n: vs[t][n] * (experts[t][n] - base[n]) ** 2 for n in base}
        top = torch.sort(torch.cat([x.reshape(-1) for x in s.values()]), descending=True).values
        k = int(torch.searchsorted(torch.cumsum(top, 0), share * top.sum()))  # entries before the share is reached
        masks.append({n: s[n] >= top[min(k, top.numel() - 1)] for n in base})
    return masks


def ota(base, experts, vs, masks, *, p=0.5, eps=1e-26):
    out = {}
    for n in base:
        num = sum((vs[t][n] ** p + eps) * masks[t][n] * (experts[t][n] - base[n]) for t in range(len(experts)))
        den = sum((vs[t][n] ** p + eps) * masks[t][n] for t in range(len(experts)))
        out[n] = torch.where(den > 0, base[n] + num / torch.where(den > 0, den, 1.0), base[n])
    return out


def ota_elect(base, experts, vs, masks, *, p=0.5, eps=1e-26):
    """OTA with the curvature-weighted sign election: edits against sign(sum_t W_t d_t) dropped."""
    elected_masks = [{} for _ in experts]
    for n in base:
        vote = sum((vs[t][n] ** p + eps) * masks[t][n] * (experts[t][n] - base[n]) for t in range(len(experts)))
        for t in range(len(experts)):
            elected_masks[t][n] = masks[t][n] & (torch.sign(experts[t][n] - base[n]) == torch.sign(vote))
    return ota(base, experts, vs, elected_masks, p=p, eps=eps)


def fisher(experts, vs, eps=1e-26):
    return {
        n: sum((vs[t][n] + eps) * experts[t][n] for t in range(len(experts)))
        / sum(vs[t][n] + eps for t in range(len(experts)))
        for n in experts[0]
    }


def linear(experts):
    return {n: sum(e[n] for e in experts) / len(experts) for n in experts[0]}


def task_arithmetic(base, experts, lam):
    return {n: base[n] + lam * sum(e[n] - base[n] for e in experts) for n in base}


def ties(base, experts, density, lam):
    out = {}
    for n in base:
        trimmed = []
        for e in experts:
            d = (e[n] - base[n]).reshape(-1)
            k = round(density * d.numel())
            keep = torch.zeros_like(d, dtype=torch.bool)
            keep[torch.argsort(d.abs(), descending=True)[:k]] = True
            trimmed.append((d * keep).reshape(base[n].shape))
        stacked = torch.stack(trimmed)
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        out[n] = base[n] + lam * (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


def keep_all(ins):
    """FFG masks that keep every edit."""
    return [{n: torch.ones_like(x, dtype=torch.bool) for n, x in ins["base"].items()} for _ in ins["experts"]]


def mostly_close(fraction, atol=1e-6, rtol=1e-5):
    """A tolerance: at most ``fraction`` of all entries may differ (e.g. at an FFG threshold's edge)."""

    def check(got, want):
        total = sum(x.numel() for x in want.values())
        differing = sum(int((~torch.isclose(got[n], want[n], atol=atol, rtol=rtol)).sum()) for n in want)
        return None if differing <= fraction * total else f"{differing} of {total} entries differ"

    return check


def bernoulli_keep(seed, name, index, shape, q):
    """The keep mask DARE-style methods draw for expert ``index`` of tensor ``name``: uniform
    draws from a generator seeded by (seed, crc32(name), index), kept where >= q (the documented
    stream contract of ota_trainer's random methods)."""
    import zlib

    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + index) % 2**63)
    return torch.rand(shape, generator=g) >= q


def dare(base, experts, q, seed, lam):
    out = {}
    for n in base:
        total = 0.0
        for t, e in enumerate(experts):
            keep = bernoulli_keep(seed, n, t, base[n].shape, q)
            total = total + (e[n] - base[n]) * keep / (1 - q)
        out[n] = base[n] + lam * total
    return out


def dare_ties(base, experts, density, seed, lam):
    """DARE keep mask (dare's stream, kept where u >= 1 - density), rescale by 1/density, then TIES."""
    out = {}
    for n in base:
        dropped = [
            (e[n] - base[n]) * bernoulli_keep(seed, n, t, base[n].shape, 1 - density) / density
            for t, e in enumerate(experts)
        ]
        stacked = torch.stack(dropped)
        agree = (torch.sign(stacked) == torch.sign(stacked.sum(0))) & (stacked != 0)
        out[n] = base[n] + lam * (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


def dare_linear(base, experts, density, seed, lam):
    """DARE keep mask and 1/density rescaling, then the task vectors' average (unit weights)."""
    out = {}
    for n in base:
        dropped = [
            (e[n] - base[n]) * bernoulli_keep(seed, n, t, base[n].shape, 1 - density) / density
            for t, e in enumerate(experts)
        ]
        out[n] = base[n] + lam * sum(dropped) / len(experts)
    return out


def breadcrumbs(base, experts, density, gamma, lam):
    """Per tensor: k_out = round(gamma N) largest |d| dropped (capped at N - k_in), the next
    k_in = round(density N) kept; ties at an edge go with the larger magnitudes (a value threshold
    from the descending sort)."""
    out = {}
    for n in base:
        total = torch.zeros_like(base[n])
        for e in experts:
            d = e[n] - base[n]
            a = d.abs().reshape(-1)
            size = a.numel()
            k_in = round(density * size)
            k_out = min(round(gamma * size), size - k_in)
            s = torch.sort(a, descending=True).values
            hi = s[k_out - 1] if k_out > 0 else float("inf")
            lo = s[k_out + k_in - 1] if k_in > 0 else float("inf")
            total = total + d * ((d.abs() >= lo) & (d.abs() < hi))
        out[n] = base[n] + lam * total
    return out


def della(base, experts, density, epsilon, seed, lam):
    """MAGPRUNE per row (rows of the (shape[0], rest) view; a single column or a 1-D tensor is one
    row): rank r = #entries of the row with smaller |d|, drop probability
    p = (1 - density) + epsilon (1 - 2 r / (n - 1)), kept where u >= p (dare's stream), rescaled by
    1/(1 - p); then TIES's election and mean."""
    out = {}
    for n in base:
        pruned = []
        for t, e in enumerate(experts):
            d = e[n] - base[n]
            rows = d.reshape(d.shape[0], -1) if d.dim() >= 2 else d.reshape(1, -1)
            if rows.shape[1] == 1:
                rows = rows.reshape(1, -1)
            a = rows.abs()
            width = a.shape[1]
            rank = (a[:, None, :] < a[:, :, None]).sum(-1).to(torch.float64)  # [row, i]: #j with a_j < a_i
            rho = rank / (width - 1) if width > 1 else torch.full_like(a, 0.5)
            p = ((1 - density) + epsilon * (1 - 2 * rho)).reshape(d.shape)
            pruned.append(d * bernoulli_keep(seed, n, t, d.shape, p) / (1 - p))
        stacked = torch.stack(pruned)
        agree = (torch.sign(stacked) == torch.sign(stacked.sum(0))) & (stacked != 0)
        out[n] = base[n] + lam * (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


# -- mergekit's semantics, written from its documented formulas (for tests/mergekit_recipes/) ----------
def mergekit_setting(value, name, t):
    """A mergekit parameter setting for tensor ``name`` at layer position ``t``: a scalar, a
    gradient (list of numbers, linearly interpolated), or a list of {filter, value} (first
    whose filter is a substring of the name, or has none)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return value
    if all(isinstance(v, dict) for v in value):
        for cond in value:
            if cond.get("filter") in (None, "*") or cond["filter"] in name:
                return mergekit_setting(cond["value"], name, t)
        return None
    pos = t * (len(value) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(value) - 1)
    return value[lo] + (pos - lo) * (value[hi] - value[lo])


def mergekit_t(name, layers):
    """0 outside the decoder layers; i / (layers - 1) in layer i."""
    parts = name.split(".")
    if "layers" not in parts:
        return 0.0
    i = int(parts[parts.index("layers") + 1])
    return i / (layers - 1) if layers > 1 else 1.0


def mergekit_linear(experts, params, layers, normalize=True):
    out = {}
    for n in experts[0]:
        t = mergekit_t(n, layers)
        w = [mergekit_setting(p["weight"], n, t) for p in params]
        total = sum(wi * e[n] for wi, e in zip(w, experts))
        out[n] = total / sum(w) if normalize else total
    return out


def mergekit_gta(base, experts, params, layers, *, sparsify, consensus, normalize, lam=1.0, seed=0):
    """mergekit's generalized task arithmetic: sparsify each task vector (``magnitude``: the
    int(density * numel) largest |d|; ``random``: ota_trainer's documented DARE stream, kept
    edits / density), weight it, optionally elect signs (``sum``: sign of the weighted sum, ties
    to +), sum, optionally divide by the contributing weights' sum, scale by lambda."""
    out = {}
    for n in base:
        t = mergekit_t(n, layers)
        deltas, weights = [], []
        for i, (e, p) in enumerate(zip(experts, params)):
            d = e[n] - base[n]
            density = mergekit_setting(p.get("density", 1.0), n, t)
            if sparsify == "magnitude" and density < 1:
                flat = d.reshape(-1)
                keep = torch.zeros_like(flat, dtype=torch.bool)
                keep[torch.argsort(flat.abs(), descending=True)[: int(density * flat.numel())]] = True
                d = (flat * keep).reshape(d.shape)
            elif sparsify == "random" and density < 1:
                d = d * bernoulli_keep(seed, n, i, d.shape, 1 - density) / density
            deltas.append(d)
            weights.append(mergekit_setting(p["weight"], n, t))
        stacked = torch.stack(deltas)
        w = torch.tensor(weights, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.dim() - 1))
        weighted = stacked * w
        if consensus:
            majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
            mask = torch.sign(weighted) == majority
            mixed = (weighted * mask).sum(0)
            divisor = (w * mask).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(0)
            divisor = w.sum(0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed = mixed / divisor
        out[n] = base[n] + lam * mixed
    return out
