"""Merged bytes pinned before the one-runner redesign (#14): every recipe of
tests/pinned_recipes.py must give exactly these bytes (and FFG report figures) on every backend,
forever after, unless a change of results is deliberate and said so in its commit."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from pinned_recipes import RECIPES

from ota_trainer import merge
from ota_trainer.io import write

PINNED = {
    "ota": "28e41e97a41f9f41",
    "ota_threshold": "ba44e5176b342172",
    "ota_per_tensor": "aedbe518125e9039",
    "ota_magnitude": "3af15967dfb188d7",
    "ota_share": "10920501b6950e44",
    "ota_mean_p1": "2cd0b6db1629a908",
    "ota_no_graft": "c11d0129f93044b4",
    "ota_no_bias": "0fee75db4af0d1d8",
    "ota_bf16_out": "d92e0ca86009ee48",
    "ota_sharded": "63e3e25de058bd18",
    "fisher": "5cec2291c8358ad2",
    "task_arithmetic": "673672eaea017a9a",
    "linear": "1e0d019164b8a968",
    "ties": "500fbde545154768",
    "dare": "568baa4fbd298862",
    "bf16_ota": "5db20bb22b8ea91c",
    "bf16_ties": "8bc47c3afc14011a",
    "bf16_fisher": "052ff8029ac77931",
    "bf16_ota_f32_out": "95418721fdc1a950",
    "ota_default": "28e41e97a41f9f41",  # the defaults: the paper's recipe (the same bytes as "ota")
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from ota_trainer.testing.tiny import make_tiny_base, make_tiny_expert

    root = tmp_path_factory.mktemp("pinned")
    base = make_tiny_base(root / "base", seed=0)
    bb = make_tiny_base(root / "bbase", seed=0, dtype=torch.bfloat16, hidden=96)
    return {
        "fp32": (
            base,
            [
                make_tiny_expert(base, root / "e1", seed=1, moments="full"),
                make_tiny_expert(base, root / "e2", seed=2, moments="full", step=50),
                make_tiny_expert(base, root / "e3", seed=3, moments="rank1"),
            ],
        ),
        "bf16": (
            bb,
            [
                make_tiny_expert(bb, root / "b1", seed=1, moments="rank1"),
                make_tiny_expert(bb, root / "b2", seed=2, moments="full"),
            ],
        ),
    }


def digest(folder) -> str:
    """sha256 of the output's weight files (in name order) and the FFG report figures, 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.suffix == ".safetensors"):
        h.update(f.read_bytes())
    rep = json.loads((folder / "ota_merge_report.json").read_text())
    # the FFG figures (not the labels, nor the no_moments flag added after the hashes were pinned)
    experts = [{k: v for k, v in e.items() if k not in ("model", "no_moments")} for e in rep["experts"]]
    h.update(json.dumps([experts, rep["tensor_density"]], sort_keys=True).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("backend", ["default", "small-staging", "torch"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_merged_bytes_are_pinned(families, tmp_path, monkeypatch, name, backend):
    family, method, params, extra = RECIPES[name]
    base, experts = families[family]
    if backend == "torch":  # the PyTorch code path only: no native kernels, no fast path
        monkeypatch.setenv("OTA_TRAINER_NATIVE", "0")
    if backend == "small-staging":  # most tensors merged into the backend's arena, a few in the writer's memory
        monkeypatch.setattr(write, "STAGING_BYTES", 8192)
    recipe = {
        "method": method,
        "base_model": str(base),
        "models": [str(e) for e in experts],
        "parameters": params,
        **extra,
    }
    merge(recipe, tmp_path / "out", quiet=True)
    assert digest(tmp_path / "out") == PINNED[name]
