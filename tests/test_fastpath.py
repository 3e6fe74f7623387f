"""The merge without PyTorch (ota_trainer.merger.fastpath) writes exactly what the engine writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ota_trainer.backends import native
from ota_trainer.merger import engine, fastpath
from ota_trainer.merger.recipe import MergeRecipe
from ota_trainer.merger.engine import REPORT_FILE
from ota_trainer.errors import NumericalError, OutputExistsError
from ota_trainer.merger.thresholds import density_bin

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.why_unavailable()}")

COVERED = {
    "density": ("ota", {"density": 0.3}),
    "no_bias_correction": ("ota", {"density": 0.5, "bias_correction": False}),
    "threshold": ("ota", {"threshold": 1e-13}),
    "threshold_zero": ("ota", {"threshold": 0.0}),
    "magnitude": ("ota", {"density": 0.4, "score": "magnitude"}),
    "no_graft_power_1": ("ota", {"graft": False, "power": 1.0}),
    "weights": ("ota", {"density": 0.6}),
    "ties": ("ties", {"density": 0.4, "lambda": 0.8}),
}


def _recipe(m, method, params, experts=("e1", "e2", "e3"), **extra):
    models = [{"model": str(m[e]), "parameters": {"weight": w}} for e, w in zip(experts, (1.5, 0.5, 1.0))]
    return MergeRecipe.from_dict({"method": method, "base_model": str(m["base"]), "parameters": params, "models": models, **extra})


def _same(a_dir, b_dir):
    files = sorted(p.name for p in a_dir.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b_dir.glob("*.safetensors"))
    for f in files:
        a, b = load_file(str(a_dir / f)), load_file(str(b_dir / f))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / REPORT_FILE).read_text()) for d in (a_dir, b_dir))
    for r in (ra, rb):
        r.pop("seconds")
        r.pop("out_dir")
    assert ra == rb
    for f in ("config.json", "README.md", "ota_merge.yaml", "generation_config.json"):
        if (b_dir / f).is_file() or (a_dir / f).is_file():
            text = (a_dir / f).read_text()
            assert text.replace(str(a_dir), "") == (b_dir / f).read_text().replace(str(b_dir), ""), f


@pytest.mark.parametrize("models", ["tiny_models", "bf16_models"])
@pytest.mark.parametrize("name", sorted(COVERED))
def test_fast_path_writes_what_the_engine_writes(models, name, request, tmp_path, monkeypatch):
    m = request.getfixturevalue(models)
    method, params = COVERED[name]
    recipe = _recipe(m, method, params, experts=("e1", "e2", "e3") if models == "tiny_models" or method == "ties" else ("e1", "e2"))
    report = fastpath.merge(recipe, tmp_path / "fast", quiet=True)
    assert report is not None, "the fast path should cover this recipe"
    engine.merge(recipe, tmp_path / "native", quiet=True, fast_path=False)
    _same(tmp_path / "fast", tmp_path / "native")
    monkeypatch.setenv("OTA_TRAINER_NATIVE", "0")
    engine.merge(recipe, tmp_path / "torch", quiet=True)
    _same(tmp_path / "fast", tmp_path / "torch")


def test_fast_path_output_options(tiny_models, tmp_path):
    recipe = _recipe(tiny_models, "ota", {"density": 0.4}, dtype="bfloat16", options={"shard_size": "100KB"})
    assert fastpath.merge(recipe, tmp_path / "fast", quiet=True) is not None
    engine.merge(recipe, tmp_path / "engine", quiet=True, fast_path=False)
    assert len(list((tmp_path / "fast").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "fast" / "model.safetensors.index.json").read_text() == (tmp_path / "engine" / "model.safetensors.index.json").read_text()
    _same(tmp_path / "fast", tmp_path / "engine")


def test_merge_takes_the_fast_path_where_it_covers_the_recipe(tiny_models, tmp_path, monkeypatch):
    calls = []
    real = fastpath.merge
    monkeypatch.setattr(fastpath, "merge", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    engine.merge(_recipe(tiny_models, "ota", {"density": 0.4}), tmp_path / "a", quiet=True)
    engine.merge(_recipe(tiny_models, "ota", {"density": 0.4, "normalise": "mean"}), tmp_path / "b", quiet=True)
    assert calls[0] is not None and calls[1] is None  # normalise: mean is the engine's alone
    assert (tmp_path / "b" / "model.safetensors").is_file()


DECLINED = {
    "normalise_mean": ("ota", {"density": 0.4, "normalise": "mean"}),
    "power": ("ota", {"density": 0.4, "power": 0.25}),
    "per_tensor": ("ota", {"density": 0.4, "per_tensor": True}),
    "share": ("ota", {"saliency_share": 0.9}),
    "linear": ("linear", {}),
    "dare": ("dare", {"drop_rate": 0.5}),
}


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_recipes_it_does_not_cover_are_declined_leaving_nothing(tiny_models, tmp_path, name):
    method, params = DECLINED[name]
    out = tmp_path / "out"
    assert fastpath.merge(_recipe(tiny_models, method, params), out, quiet=True) is None
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_inputs_get_the_same_error_from_both_paths(bf16_models, tmp_path):
    """Inputs are opened and checked once, for every backend (ota_trainer.merger.inputs): missing moments
    are the same MissingMomentsError through the fast path as through the engine."""
    from ota_trainer.errors import MissingMomentsError

    recipe = _recipe(bf16_models, "ota", {"density": 0.4})  # e3 has no moments
    with pytest.raises(MissingMomentsError, match="no second moments"):
        fastpath.merge(recipe, tmp_path / "out", quiet=True)
    with pytest.raises(MissingMomentsError, match="no second moments"):
        engine.merge(recipe, tmp_path / "out", quiet=True, fast_path=False)
    assert not list(tmp_path.iterdir())


def test_non_finite_input_is_declined_then_named_by_the_engine(tiny_models, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["e3"], bad)
    weights = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    recipe = MergeRecipe.from_dict({"method": "ota", "base_model": str(tiny_models["base"]), "models": [str(bad)],
                                    "parameters": {"graft": False}})
    assert fastpath.merge(recipe, tmp_path / "out", quiet=True) is None
    assert not (tmp_path / "out").exists()
    with pytest.raises(NumericalError, match="up_proj"):
        engine.merge(recipe, tmp_path / "out", quiet=True)


def test_it_can_be_turned_off(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("OTA_TRAINER_FAST_PATH", "0")
    assert fastpath.merge(_recipe(tiny_models, "ota", {"density": 0.4}), tmp_path / "out", quiet=True) is None
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_as_by_the_engine(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        fastpath.merge(_recipe(tiny_models, "ota", {"density": 0.4}), out, quiet=True)
    assert (out / "keep.txt").read_text() == "x"


def test_cli_merges_without_loading_pytorch(tiny_models, tmp_path):
    recipe = _recipe(tiny_models, "ota", {"density": 0.4})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    code = ("import sys; from ota_trainer.cli.merge import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'PyTorch was loaded'; sys.exit(rc)")
    subprocess.run([sys.executable, "-c", code, "--recipe", str(path), "--out", str(tmp_path / "cli"), "--quiet"],
                   check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    engine.merge(recipe, tmp_path / "engine", quiet=True, fast_path=False)
    _same(tmp_path / "cli", tmp_path / "engine")


def test_density_bin_is_the_argmin_over_all_bins():
    """Against the definition on the dense histogram: argmin_b |sum(counts[b:]) - target|, b >= 1."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 64
        counts = torch.zeros(n, dtype=torch.int64)
        k = int(torch.randint(1, 12, (1,), generator=g))
        idx = torch.randint(0, n - 1, (k,), generator=g)  # the top bin stays empty, as in the real histogram
        counts[idx] = torch.randint(1, 50, (k,), generator=g)
        if trial % 3 == 0:
            counts[0] = 7  # zero saliencies
        total = int(counts.sum())
        density = float(torch.rand((), generator=g)) * 0.98 + 0.01
        kept_from = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])
        target = density * total
        zeros = int(counts[0])
        want = None if target >= (total - zeros) + 0.5 * zeros else 1 + int(torch.argmin((kept_from[1:].double() - target).abs()))
        bins = torch.nonzero(counts).reshape(-1).tolist()
        assert density_bin(bins, [int(counts[b]) for b in bins], total, density) == want, trial


def test_negative_moments_are_declined_then_named_by_the_engine(tiny_models, tmp_path):
    import shutil

    from safetensors import safe_open

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["e3"], bad)  # rank-one moments
    path = bad / "ota" / "moments.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("::row"))
    tensors[key][0] = -1.0
    save_file(tensors, str(path), metadata=meta)
    recipe = MergeRecipe.from_dict({"method": "ota", "base_model": str(tiny_models["base"]), "models": [str(bad)]})
    assert fastpath.merge(recipe, tmp_path / "out", quiet=True) is None
    with pytest.raises(NumericalError, match="negative"):
        engine.merge(recipe, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
