"""Bad input: a clear error naming the file/tensor/model, and nothing left at the output."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ota_trainer import (
    ConfigError,
    FormatError,
    IncompatibleModelsError,
    MissingMomentsError,
    NumericalError,
    OutputExistsError,
    load_moments,
    merge,
    save_moments,
)

Q = "model.layers.0.self_attn.q_proj.weight"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_moments(folder, fn):
    m = load_moments(folder)
    full = {n: m[n] for n in m}
    meta = dict(m.metadata)
    fn(full)
    save_moments(folder, full, compression=meta["compression"], metadata={"step": meta["step"], "beta2": meta["beta2"]})


def _run(tiny, tmp_path, experts, **kw):
    out = tmp_path / "out"
    recipe = {
        "method": kw.pop("method", "ota"),
        "base_model": str(kw.pop("base", tiny["base"])),
        "models": [str(e) for e in experts],
    }
    recipe.update(kw)
    try:
        return merge(recipe, out, quiet=True)
    finally:
        pass


def _nothing_left(tmp_path):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".out")]
    assert leftovers == []


def test_shape_differs(tiny_models, tmp_path):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    _edit_weights(bad, lambda t: t.__setitem__(Q, torch.zeros(32, 64)))
    with pytest.raises(IncompatibleModelsError, match=Q) as e:
        _run(tiny_models, tmp_path, [tiny_models["e2"], bad], method="linear")
    assert e.value.tensor == Q and str(bad) in str(e.value)
    _nothing_left(tmp_path)


def test_expert_lacks_a_tensor(tiny_models, tmp_path):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    _edit_weights(bad, lambda t: t.pop(Q))
    with pytest.raises(IncompatibleModelsError, match="lacks 1 tensor.*q_proj"):
        _run(tiny_models, tmp_path, [bad, tiny_models["e2"]])
    _nothing_left(tmp_path)


def test_expert_has_extra_tensors(tiny_models, tmp_path):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    _edit_weights(bad, lambda t: t.__setitem__("lm_head.weight", torch.zeros(128, 64)))
    with pytest.raises(IncompatibleModelsError, match="lm_head.weight"):
        _run(tiny_models, tmp_path, [bad, tiny_models["e2"]], method="ties")
    _nothing_left(tmp_path)


def test_resized_vocabulary(tiny_models, tmp_path):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    _edit_weights(bad, lambda t: t.__setitem__("model.embed_tokens.weight", torch.zeros(130, 64)))
    with pytest.raises(IncompatibleModelsError, match="vocabulary was resized: 130 vs 128"):
        _run(tiny_models, tmp_path, [bad, tiny_models["e2"]], method="linear")
    _nothing_left(tmp_path)


def test_architecture_differs(tiny_models, tmp_path):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    cfg = (bad / "config.json").read_text().replace("LlamaForCausalLM", "MistralForCausalLM")
    (bad / "config.json").write_text(cfg)
    with pytest.raises(IncompatibleModelsError, match="architecture"):
        _run(tiny_models, tmp_path, [bad])
    _nothing_left(tmp_path)


def test_moments_missing_entirely(tiny_models, tmp_path):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    shutil.rmtree(bad / "ota")
    with pytest.raises(MissingMomentsError, match="OTACallback") as e:
        _run(tiny_models, tmp_path, [bad, tiny_models["e2"]])
    assert "linear, task_arithmetic, ties, dare" in str(e.value)
    _nothing_left(tmp_path)


def test_moments_missing_for_one_parameter_errors_or_falls_back(tiny_models, tmp_path, caplog):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    _edit_moments(bad, lambda m: m.pop(Q))
    with pytest.raises(MissingMomentsError, match="q_proj") as e:
        _run(tiny_models, tmp_path, [bad, tiny_models["e2"]])
    assert e.value.tensor == Q
    _nothing_left(tmp_path)
    with caplog.at_level(logging.WARNING):
        report = _run(tiny_models, tmp_path, [bad, tiny_models["e2"]], options={"allow_missing_moments": True})
    assert "uniform curvature" in caplog.text
    assert report.tensor_density[Q][0] == 1.0  # no evidence to prune that tensor: all edits kept


def test_moments_for_a_different_model(tiny_models, tmp_path):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    _edit_moments(bad, lambda m: m.__setitem__("model.layers.7.mlp.up_proj.weight", torch.ones(4, 4)))
    with pytest.raises(IncompatibleModelsError, match="different model"):
        _run(tiny_models, tmp_path, [bad, tiny_models["e2"]])
    bad2 = _copy(tiny_models["e1"], tmp_path / "bad2")
    _edit_moments(bad2, lambda m: m.__setitem__(Q, torch.ones(64, 32)))
    with pytest.raises(IncompatibleModelsError, match="shape"):
        _run(tiny_models, tmp_path, [bad2, tiny_models["e2"]])
    _nothing_left(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(tiny_models, tmp_path, value):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")

    def poison(t):
        t[Q][3, 3] = value

    _edit_weights(bad, poison)
    with pytest.raises(NumericalError, match="q_proj.*NaN or Inf") as e:
        _run(tiny_models, tmp_path, [bad, tiny_models["e2"]], method="task_arithmetic")
    assert e.value.model == str(bad)
    _nothing_left(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), -1.0])
def test_bad_moments_in_file(tiny_models, tmp_path, value):
    """Moments written by another tool (bypassing save_moments' checks)."""
    import json

    from safetensors import safe_open

    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    path = bad / "ota" / "moments.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[Q][0, 0] = value
    save_file(tensors, str(path), metadata=meta)
    assert json.loads(meta["ota_moments"])["compression"] == "full"
    with pytest.raises(NumericalError, match="q_proj"):
        _run(tiny_models, tmp_path, [bad, tiny_models["e2"]])
    _nothing_left(tmp_path)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_out_of_range(tiny_models, tmp_path, density):
    with pytest.raises(ConfigError, match="density"):
        _run(tiny_models, tmp_path, [tiny_models["e1"]], parameters={"density": density})
    _nothing_left(tmp_path)


def test_unknown_method_and_option(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="unknown merge method 'slerpy'"):
        _run(tiny_models, tmp_path, [tiny_models["e1"]], method="slerpy")
    with pytest.raises(ConfigError, match="unknown parameter 'densty'"):
        _run(tiny_models, tmp_path, [tiny_models["e1"]], parameters={"densty": 0.3})
    with pytest.raises(ConfigError, match="unknown recipe options"):
        _run(tiny_models, tmp_path, [tiny_models["e1"]], options={"fast": True})
    with pytest.raises(ConfigError, match="one FFG rule"):
        _run(tiny_models, tmp_path, [tiny_models["e1"]], parameters={"density": 0.3, "threshold": 1e-9})
    _nothing_left(tmp_path)


def test_truncated_weights(tiny_models, tmp_path):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated") as e:
        _run(tiny_models, tmp_path, [bad])
    assert str(bad / "model.safetensors") in str(e.value)
    _nothing_left(tmp_path)


def test_corrupt_moments_file(tiny_models, tmp_path):
    bad = _copy(tiny_models["e1"], tmp_path / "bad")
    (bad / "ota" / "moments.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(FormatError, match="moments.safetensors"):
        _run(tiny_models, tmp_path, [bad])
    _nothing_left(tmp_path)


def test_output_exists_and_is_not_empty(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _run(tiny_models, tmp_path, [tiny_models["e1"]], method="linear")
    assert (out / "keep.txt").read_text() == "precious"
    merge({"method": "linear", "models": [str(tiny_models["e1"])]}, out, overwrite=True, quiet=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_failure_midway_leaves_previous_output_untouched(tiny_models, tmp_path):
    out = tmp_path / "out"
    merge({"method": "linear", "models": [str(tiny_models["e1"])]}, out, quiet=True)
    before = (out / "model.safetensors").read_bytes()
    bad = _copy(tiny_models["e2"], tmp_path / "bad")
    _edit_weights(bad, lambda t: t["model.norm.weight"].fill_(float("nan")))
    with pytest.raises(NumericalError):
        merge({"method": "linear", "models": [str(tiny_models["e1"]), str(bad)]}, out, overwrite=True, quiet=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_missing_base_or_folder(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="base_model"):
        merge({"method": "ota", "models": [str(tiny_models["e1"])]}, tmp_path / "out")
    with pytest.raises(FormatError, match="no such folder"):
        _run(tiny_models, tmp_path, [tmp_path / "nowhere"])
    _nothing_left(tmp_path)
