"""The backends (#14): the runner picks one by what it covers, and every backend writes the same
bytes and report. Backends: the native kernels without PyTorch (``native``), PyTorch with the
kernels' hot loops on its tensors (``torch+kernels``), pure PyTorch (``torch``), and a CLI run
that never imports PyTorch (``no-torch``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ota_trainer import merge
from ota_trainer.backends import native
from ota_trainer.backends.native.backend import NativeBackend
from ota_trainer.backends.thresholds import density_bin
from ota_trainer.cli.merge import main as cli_main
from ota_trainer.errors import NumericalError, OutputExistsError
from ota_trainer.merger.inputs import open_inputs
from ota_trainer.merger.recipe import MergeRecipe
from ota_trainer.merger.report import REPORT_FILE, local_resolver
from ota_trainer.merger.runner import choose_backend

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.why_unavailable()}"
)

# recipes the native kernels cover
COVERED = {
    "density": ("ota", {"density": 0.3}),
    "no_bias_correction": ("ota", {"density": 0.5, "bias_correction": False}),
    "threshold": ("ota", {"threshold": 1e-13}),
    "threshold_zero": ("ota", {"threshold": 0.0}),
    "magnitude": ("ota", {"density": 0.4, "score": "magnitude"}),
    "no_graft_power_1": ("ota", {"graft": False, "power": 1.0}),
    "share": ("ota", {"saliency_share": 0.9}),
    "weights": ("ota", {"density": 0.6}),
    "ties": ("ties", {"density": 0.4, "lambda": 0.8}),
}
# recipes they do not, and why
DECLINED = {
    "normalise_mean": ("ota", {"density": 0.4, "normalise": "mean"}, "normalise"),
    "power": ("ota", {"density": 0.4, "power": 0.25}, "power"),
    "per_tensor": ("ota", {"density": 0.4, "per_tensor": True}, "per-tensor"),
    "linear": ("linear", {}, "no native implementation"),
    "dare": ("dare", {"drop_rate": 0.5}, "no native implementation"),
}
BACKENDS = ("native", "torch+kernels", "torch")


def _recipe(m, method, params, experts=("e1", "e2", "e3"), **extra):
    if method == "ota":  # the paper's OTA unless a case says otherwise: what the native kernels run
        params = {"elect_sign": False, **params}
    models = [{"model": str(m[e]), "parameters": {"weight": w}} for e, w in zip(experts, (1.5, 0.5, 1.0))]
    return MergeRecipe.from_dict(
        {"method": method, "base_model": str(m["base"]), "parameters": params, "models": models, **extra}
    )


def _run(recipe, out, backend, monkeypatch):
    """Merge with one backend (and check it is the one that ran)."""
    if backend == "torch":
        monkeypatch.setenv("OTA_TRAINER_NATIVE", "0")
    cls, _ = choose_backend(recipe, open_inputs(recipe, local_resolver), fast_path=backend == "native")
    assert (cls is NativeBackend) == (backend == "native")
    try:
        return merge(recipe, out, quiet=True, fast_path=backend == "native")
    finally:
        monkeypatch.delenv("OTA_TRAINER_NATIVE", raising=False)


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
def test_every_backend_writes_the_same_bytes(models, name, request, tmp_path, monkeypatch):
    m = request.getfixturevalue(models)
    method, params = COVERED[name]
    recipe = _recipe(
        m, method, params, experts=("e1", "e2", "e3") if models == "tiny_models" or method == "ties" else ("e1", "e2")
    )
    for backend in BACKENDS:
        _run(recipe, tmp_path / backend, backend, monkeypatch)
    _same(tmp_path / "native", tmp_path / "torch+kernels")
    _same(tmp_path / "native", tmp_path / "torch")


def test_output_options_on_every_backend(tiny_models, tmp_path, monkeypatch):
    recipe = _recipe(tiny_models, "ota", {"density": 0.4}, dtype="bfloat16", options={"shard_size": "100KB"})
    for backend in BACKENDS:
        _run(recipe, tmp_path / backend, backend, monkeypatch)
    assert len(list((tmp_path / "native").glob("model-*.safetensors"))) > 1
    index = (tmp_path / "native" / "model.safetensors.index.json").read_text()
    assert index == (tmp_path / "torch" / "model.safetensors.index.json").read_text()
    _same(tmp_path / "native", tmp_path / "torch")


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_what_the_kernels_do_not_cover_goes_to_pytorch_with_the_reason(
    tiny_models, tmp_path, monkeypatch, caplog, name
):
    method, params, why = DECLINED[name]
    recipe = _recipe(tiny_models, method, params)
    cls, reason = choose_backend(recipe, open_inputs(recipe, local_resolver))
    assert cls is not NativeBackend and why in reason
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        merge(recipe, tmp_path / "default", quiet=True)
    assert f"merging with PyTorch (the native kernels do not cover this: {reason})" in caplog.text
    _run(recipe, tmp_path / "torch", "torch", monkeypatch)
    _same(tmp_path / "default", tmp_path / "torch")


def test_the_switches_keep_working(tiny_models, monkeypatch):
    recipe = _recipe(tiny_models, "ota", {"density": 0.4})
    inputs = open_inputs(recipe, local_resolver)
    assert choose_backend(recipe, inputs)[0] is NativeBackend
    monkeypatch.setenv("OTA_TRAINER_FAST_PATH", "0")
    assert "OTA_TRAINER_FAST_PATH=0" in choose_backend(recipe, inputs)[1]
    monkeypatch.setenv("OTA_TRAINER_FAST_PATH", "1")
    monkeypatch.setenv("OTA_TRAINER_NATIVE", "0")
    assert "no native kernels" in choose_backend(recipe, inputs)[1]


def test_an_existing_output_is_refused_before_any_work(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        merge(_recipe(tiny_models, "ota", {"density": 0.4}), out, quiet=True)
    assert (out / "keep.txt").read_text() == "x"


def test_non_finite_weights_are_named_by_the_native_backend_too(tiny_models, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["e3"], bad)
    weights = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    recipe = MergeRecipe.from_dict(
        {
            "method": "ota",
            "base_model": str(tiny_models["base"]),
            "models": [str(bad)],
            "parameters": {"graft": False, "elect_sign": False},
        }
    )
    assert choose_backend(recipe, open_inputs(recipe, local_resolver))[0] is NativeBackend
    with pytest.raises(NumericalError, match="up_proj.*NaN or Inf"):
        merge(recipe, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_negative_moments_are_named_by_the_native_backend(tiny_models, tmp_path):
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
    with pytest.raises(NumericalError, match=f"{key.removesuffix('::row')}.*negative"):
        merge(recipe, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_cli_merges_without_loading_pytorch(tiny_models, tmp_path):
    recipe = _recipe(tiny_models, "ota", {"density": 0.4})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    code = (
        "import sys; from ota_trainer.cli.merge import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'PyTorch was loaded'; sys.exit(rc)"
    )
    subprocess.run(
        [sys.executable, "-c", code, "--recipe", str(path), "--out", str(tmp_path / "no-torch"), "--quiet"],
        check=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    merge(recipe, tmp_path / "torch", quiet=True, fast_path=False)
    _same(tmp_path / "no-torch", tmp_path / "torch")


def test_light_modules_load_no_pytorch():
    code = (
        "import sys; from ota_trainer.merger import inputs, recipe, runner, methods, report, ffg_cache; "
        "from ota_trainer.backends import thresholds; "
        "from ota_trainer.io import readahead, layout, write, cache; from ota_trainer.backends import native; "
        "from ota_trainer.backends.native import backend; import ota_trainer.cli.merge; "
        "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('torch'))[:3]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))


HISTOGRAMS = {
    "density": {"density": 0.3},
    "bias_correction": {"density": 0.5, "bias_correction": False},
    "magnitude": {"density": 0.4, "score": "magnitude"},
    "share": {"saliency_share": 0.9},
}


@pytest.mark.parametrize("name", sorted(HISTOGRAMS))
def test_the_native_ffg_pass_counts_what_pytorch_counts(tiny_models, name):
    from ota_trainer.backends.torch import TorchBackend

    recipe = _recipe(tiny_models, "ota", HISTOGRAMS[name])
    inputs = open_inputs(recipe, local_resolver)
    todo = recipe.global_threshold_experts()
    assert NativeBackend.covers_histograms(recipe, inputs, todo) is None
    nb = NativeBackend(recipe, inputs, quiet=True)
    try:
        got = nb.histograms(todo, inputs.float_names)
        want = TorchBackend(recipe, inputs, quiet=True).histograms(todo, inputs.float_names)
        for g, w in zip(got, want):
            assert g.total == w.total > 0 and (g.bins, g.counts) == (w.bins, w.counts)
    finally:
        nb.close()


def test_when_pytorch_merges_the_kernels_count_the_ffg_pass_meanwhile(tiny_models, tmp_path, caplog, monkeypatch):
    recipe = _recipe(tiny_models, "ota", {"density": 0.4, "normalise": "mean"})  # PyTorch's: normalise mean
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        assert cli_main(["--recipe", str(path), "--out", str(tmp_path / "cli")]) == 0  # INFO: not --quiet
    assert "saliencies counted by the native kernels while PyTorch loaded" in caplog.text
    _run(recipe, tmp_path / "torch", "torch", monkeypatch)  # PyTorch counts itself
    _same(tmp_path / "cli", tmp_path / "torch")


def test_density_bin_is_the_argmin_over_all_bins():
    """Against the definition on the dense histogram: argmin_b |sum(counts[b:]) - target|, b >= 1."""
    g = torch.Generator().manual_seed(0)
    for trial in range(400):
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
        if trial % 4 == 1:  # a target halfway between two kept counts: the tie goes to the lower bin
            b = int(torch.randint(1, n - 1, (1,), generator=g))
            density = min(1.0, max(1e-6, (int(kept_from[b]) + int(kept_from[b + 1])) / 2 / max(total, 1)))
        target = density * total
        zeros = int(counts[0])
        want = (
            None
            if target >= (total - zeros) + 0.5 * zeros
            else 1 + int(torch.argmin((kept_from[1:].double() - target).abs()))
        )
        bins = torch.nonzero(counts).reshape(-1).tolist()
        assert density_bin(bins, [int(counts[b]) for b in bins], total, density) == want, trial
