"""Independent reference merges on fully loaded state dicts, with plain tensor ops.

Deliberately does not call ota_trainer's own math helpers: the engine is checked against this.
"""
from __future__ import annotations

import json
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


def ota(base, experts, vs, masks, *, p=0.5, eps=1e-26):
    out = {}
    for n in base:
        num = sum((vs[t][n] ** p + eps) * masks[t][n] * (experts[t][n] - base[n]) for t in range(len(experts)))
        den = sum((vs[t][n] ** p + eps) * masks[t][n] for t in range(len(experts)))
        out[n] = torch.where(den > 0, base[n] + num / torch.where(den > 0, den, 1.0), base[n])
    return out


def fisher(experts, vs, eps=1e-26):
    return {n: sum((vs[t][n] + eps) * experts[t][n] for t in range(len(experts))) / sum(vs[t][n] + eps for t in range(len(experts))) for n in experts[0]}


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
