"""FFG's early first pass (ota_trainer.merger.prescan): no PyTorch, and exactly the engine's histograms."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ota_trainer import merge
from ota_trainer.backends import native
from ota_trainer.merger import prescan
from ota_trainer.cli.merge import main as cli_main
from ota_trainer.merger.recipe import MergeRecipe
from ota_trainer.merger.engine import REPORT_FILE, _Engine, _local_resolver
from ota_trainer.backends.torch.ffg import SaliencyHistogram
from ota_trainer.merger.inputs import open_inputs

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.why_unavailable()}")

RECIPES = {
    "density": {"density": 0.3},
    "bias_correction": {"density": 0.5, "bias_correction": True},
    "magnitude": {"density": 0.4, "score": "magnitude"},
    "share": {"saliency_share": 0.9},
}


def _recipe(m, params, experts=("e1", "e2", "e3")):
    return MergeRecipe.from_dict({"method": "ota", "base_model": str(m["base"]), "parameters": params,
                                  "models": [str(m[e]) for e in experts]})


def test_light_modules_load_no_pytorch():
    code = ("import sys; from ota_trainer.merger import prescan, recipe, inputs; from ota_trainer.io import readahead, layout; from ota_trainer.backends import native; import ota_trainer.cli.merge; "
            "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('torch'))[:3]")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_histograms_are_the_engines_own(tiny_models, name):
    recipe = _recipe(tiny_models, RECIPES[name])
    scan = prescan.start(recipe)
    assert scan is not None and scan.wait(), scan and scan.error
    prescan._scans.remove(scan)
    engine = _Engine(recipe, open_inputs(recipe, _local_resolver), _local_resolver, quiet=True)
    experts = recipe.global_threshold_experts()
    hists = {i: SaliencyHistogram() for i in experts}
    engine._count_saliencies(experts, hists, [engine.experts[i] for i in experts])
    for i, counts, total in zip(experts, scan.counts, scan.totals):
        assert total == hists[i].total > 0
        assert torch.equal(torch.frombuffer(counts, dtype=torch.int64), hists[i].counts), f"expert {i}"


def test_cli_merge_takes_the_scan_and_writes_the_same_merge(tiny_models, tmp_path, monkeypatch):
    # normalise: mean is not the fast path's (ota_trainer.merger.fastpath): the CLI loads PyTorch and the
    # engine, and FFG's first pass runs meanwhile
    recipe = _recipe(tiny_models, {"density": 0.4, "normalise": "mean"})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    taken = []
    real_take = prescan.take
    monkeypatch.setattr(prescan, "take", lambda *a, **k: taken.append(real_take(*a, **k)) or taken[-1])
    assert cli_main(["--recipe", str(path), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert len(taken) == 1 and taken[0] is not None and not prescan._scans  # started by the CLI, taken by the engine
    merge(recipe, tmp_path / "api", quiet=True)  # no scan: the engine counts itself
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cli", "api"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / REPORT_FILE).read_text()) for d in ("cli", "api"))
    assert ra["experts"] == rb["experts"] and ra["tensor_density"] == rb["tensor_density"]


def test_a_scan_of_other_inputs_is_not_taken(tiny_models, tmp_path):
    recipe = _recipe(tiny_models, {"density": 0.4}, experts=("e3",))
    scan = prescan.start(recipe)
    assert scan is not None and scan.wait()
    base = tiny_models["base"]
    assert prescan.take(base, [tiny_models["e1"]], score="fisher", bias_correction=True) is None  # other expert
    assert prescan.take(base, [tiny_models["e3"]], score="fisher", bias_correction=False) is None  # other scale
    assert prescan.take(base, [tiny_models["e3"]], score="magnitude", bias_correction=True) is None  # other score
    weights = tiny_models["e3"] / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the file changed since the scan
    try:
        assert prescan.take(base, [tiny_models["e3"]], score="fisher", bias_correction=True) is None
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prescan.take(base, [tiny_models["e3"]], score="fisher", bias_correction=True) is scan
    assert not prescan._scans


def test_nothing_to_scan_or_declined(tiny_models, tmp_path):
    m = tiny_models
    no_pass = [{"threshold": 1e-12}, {"density": 0.4, "per_tensor": True}, {"graft": False}]
    for params in no_pass:
        assert prescan.start(_recipe(m, params)) is None
    assert prescan.start(MergeRecipe.from_dict({"method": "ties", "base_model": str(m["base"]), "models": [str(m["e1"])],
                                                "parameters": {"density": 0.4}})) is None
    assert prescan.start(MergeRecipe.from_dict({"method": "ota", "base_model": "org/not-a-folder", "models": [str(m["e1"])]})) is None
    # an expert without moments: the scan declines (the engine then reports the missing moments itself)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((m["e1"] / f).read_bytes())
    scan = prescan.start(MergeRecipe.from_dict({"method": "ota", "base_model": str(m["base"]), "models": [str(bare)]}))
    assert scan is None or not scan.wait()
    prescan._scans.clear()
