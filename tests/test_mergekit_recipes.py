"""mergekit recipes as people write them (#16 §2): each transcription in tests/mergekit_recipes/
runs through the CLI unchanged (model names pointed at tiny local models) and matches an
independent mergekit-semantics reference, or is refused with the named reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import reference as ref
import torch
import yaml
from safetensors.torch import load_file

from ota_trainer.cli.merge import main as merge_main

RECIPES = Path(__file__).parent / "mergekit_recipes"
LAYERS = 2  # the tiny models' decoder layers


def _recipe(name, models, tmp_path):
    text = (RECIPES / name).read_text()
    for key in ("BASE", "E1", "E2", "E3"):
        text = text.replace(f"model: {key}\n", f"model: {models[key.lower()]}\n").replace(
            f"base_model: {key}\n", f"base_model: {models[key.lower()]}\n"
        )
    path = tmp_path / name
    path.write_text(text)
    return path, yaml.safe_load(text)


def _params(data):
    return [m.get("parameters") or {} for m in data["models"]]


def _run(path, out, capsys):
    code = merge_main([str(path), str(out), "-q"])
    return code, capsys.readouterr().err


def _loaded(out):
    got = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got


def _expect(name, ins, data):
    p = _params(data)
    top = data.get("parameters") or {}
    kw = {"lam": top.get("lambda", 1.0)}
    if name == "linear.yml":
        return ref.mergekit_linear(ins["experts"], p, LAYERS)
    if name in ("ties.yml", "bio-merge.yml"):
        return ref.mergekit_gta(
            ins["base"],
            ins["experts"],
            p,
            LAYERS,
            sparsify="magnitude",
            consensus=True,
            normalize=top["normalize"],
            **kw,
        )
    if name == "task_arithmetic.yml":
        return ref.mergekit_gta(
            ins["base"], ins["experts"], p, LAYERS, sparsify=None, consensus=False, normalize=True, **kw
        )
    if name == "dare_ties.yml":
        return ref.mergekit_gta(
            ins["base"], ins["experts"], p, LAYERS, sparsify="random", consensus=True, normalize=True, **kw
        )
    if name == "dare_drop.yml":  # DARE: unit weights, no normalisation
        p = [{**q, "weight": 1.0} for q in p]
        return ref.mergekit_gta(
            ins["base"], ins["experts"], p, LAYERS, sparsify="random", consensus=False, normalize=False
        )
    raise AssertionError(name)


RUNS = {  # recipe -> (output dtype, fraction of entries allowed to differ: ties trims int(k) vs round(k))
    "linear.yml": (torch.float16, 0.0),
    "ties.yml": (torch.float16, 0.01),
    "bio-merge.yml": (torch.float16, 0.01),
    "task_arithmetic.yml": (torch.float32, 0.0),
    "dare_ties.yml": (torch.float32, 0.0),
    "dare_drop.yml": (torch.float32, 0.0),
}
REFUSED = {
    "gradient-slerp.yml": "layer slicing",
    "union-tokenizer.yml": "tokenizer_source: 'union' is not supported",
    "dare_ties_rescale.yml": "rescale",
}


def test_every_transcription_is_covered():
    assert {p.name for p in RECIPES.glob("*.yml")} == set(RUNS) | set(REFUSED)


@pytest.fixture(scope="module")
def ins(tiny_models):
    m = tiny_models
    return {"base": ref.state(m["base"]), "experts": [ref.state(m[k]) for k in ("e1", "e2", "e3")]}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_mergekit_recipe_runs_and_matches_mergekit_semantics(name, tiny_models, ins, tmp_path, capsys):
    path, data = _recipe(name, tiny_models, tmp_path)
    code, err = _run(path, tmp_path / "out", capsys)
    assert code == 0, err
    n = len(data["models"])
    want = _expect(name, {"base": ins["base"], "experts": ins["experts"][:n]}, data)
    got = _loaded(tmp_path / "out")
    dtype, fraction = RUNS[name]
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == dtype, k
        w = w.to(dtype).to(torch.float64)
        bad = ~torch.isclose(got[k].to(torch.float64), w, atol=1e-6, rtol=1e-3 if dtype == torch.float16 else 1e-5)
        assert bad.float().mean() <= fraction, (k, int(bad.sum()), bad.numel())
    pinned = yaml.safe_load((tmp_path / "out" / "ota_merge.yaml").read_text())
    if name == "ties.yml":  # the gradients and the filter are kept as written in the pinned recipe
        assert pinned["models"][0]["parameters"]["density"] == [1.0, 0.7, 0.1]
        assert pinned["models"][2]["parameters"]["weight"] == [{"filter": "mlp", "value": 0.5}, {"value": 0.0}]
    if name == "dare_ties.yml":
        from ota_trainer.merger.mergekit import CHATML

        assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHATML
    if name == "dare_drop.yml":
        assert [m["parameters"]["drop_rate"] for m in pinned["models"]] == pytest.approx([0.3, 0.6])
    report = json.loads((tmp_path / "out" / "ota_merge_report.json").read_text())
    assert report["method"] == data["merge_method"]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_mergekit_recipe_is_refused_with_the_reason(name, tiny_models, tmp_path, capsys):
    path, _ = _recipe(name, tiny_models, tmp_path)
    code, err = _run(path, tmp_path / "out", capsys)
    assert code == 2 and REFUSED[name] in err, err
    assert not (tmp_path / "out").exists()


def test_mergekit_keys_errors_and_info(tiny_models, tmp_path, caplog):
    """int8_mask is accepted with one info line; a parameter that cannot vary per layer says so;
    density and drop_rate together are refused; an unknown chat template name is refused."""
    import logging

    from ota_trainer import ConfigError, MergeRecipe

    m = tiny_models
    base = {"base_model": str(m["base"]), "models": [str(m["e1"]), str(m["e2"])]}
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        MergeRecipe.from_dict({**base, "merge_method": "ties", "parameters": {"int8_mask": True}})
    assert "int8_mask: accepted, no effect" in caplog.text
    with pytest.raises(ConfigError, match="cannot vary per layer"):
        MergeRecipe.from_dict({**base, "method": "ota", "parameters": {"density": [0.2, 0.4]}})
    with pytest.raises(ConfigError, match="both set"):
        MergeRecipe.from_dict({**base, "method": "dare", "parameters": {"density": 0.5, "drop_rate": 0.5}})
    with pytest.raises(ConfigError, match="not a template name we know"):
        MergeRecipe.from_dict({**base, "method": "linear", "chat_template": "alpaca"})
    with pytest.raises(ConfigError, match="a gradient is a list of numbers"):
        MergeRecipe.from_dict(
            {**base, "method": "linear", "models": [{"model": str(m["e1"]), "parameters": {"weight": [1, "x"]}}]}
        )
    r = MergeRecipe.from_dict({**base, "method": "linear", "dtype": "bf16", "out_dtype": "auto"})
    assert r.dtype is None  # auto: the base's dtype
    assert MergeRecipe.from_dict({**base, "method": "linear", "dtype": "fp16"}).dtype == "float16"


def test_chat_template_auto_takes_the_experts_template(tiny_models, tmp_path):
    """chat_template: auto is the template most experts share (here: both experts', not the base's)."""
    import shutil

    from transformers import AutoTokenizer

    from ota_trainer import merge
    from ota_trainer.testing.tiny import make_tiny_tokenizer

    m = tiny_models
    folders = {}
    for k in ("base", "e1", "e2"):
        folders[k] = tmp_path / k
        shutil.copytree(m[k], folders[k])
        make_tiny_tokenizer(folders[k])
    expert_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    for k in ("e1", "e2"):
        tok = AutoTokenizer.from_pretrained(folders[k])
        tok.chat_template = expert_template
        tok.save_pretrained(folders[k])
    recipe = {
        "method": "linear",
        "base_model": str(folders["base"]),
        "models": [str(folders["e1"]), str(folders["e2"])],
        "chat_template": "auto",
    }
    merge(recipe, tmp_path / "out", quiet=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == expert_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "user: hi\n"
