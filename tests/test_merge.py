"""End-to-end merges of tiny random models, checked against tests/reference.py."""

from __future__ import annotations

import json

import pytest
import reference as ref
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from ota_trainer import merge
from ota_trainer.merger.report import REPORT_FILE


def _merged(out):
    files = sorted(out.glob("*.safetensors"))
    result = {}
    for f in files:
        result.update({k: v.to(torch.float64) for k, v in load_file(str(f)).items()})
    return result


def _load_ok(out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def _close(got, want, atol=1e-6):
    assert set(got) == set(want)
    for n in want:
        assert_close(got[n], want[n], atol=atol, rtol=1e-5, msg=n)


@pytest.fixture(scope="module")
def ins(tiny_models):
    m = tiny_models
    experts = [ref.state(m["e1"]), ref.state(m["e2"]), ref.state(m["e3"])]
    return {
        "base": ref.state(m["base"]),
        "experts": experts,
        "vs": [ref.moments(m["e1"]), ref.moments(m["e2"]), ref.moments(m["e3"])],
        "paths": [str(m["e1"]), str(m["e2"]), str(m["e3"])],
        "base_path": str(m["base"]),
    }


def _recipe(ins, method, **params):
    if method == "ota":  # the paper's OTA (the references below) unless a test says otherwise
        params = {"elect_sign": False, **params}
    return {"method": method, "base_model": ins["base_path"], "models": ins["paths"], "parameters": params}


def test_ota_absolute_threshold_matches_reference(ins, tmp_path):
    theta = 1e-13
    report = merge(_recipe(ins, "ota", threshold=theta), tmp_path / "out", quiet=True)
    masks = ref.ffg_masks_absolute(ins["base"], ins["experts"], ins["vs"], theta)
    want = ref.ota(ins["base"], ins["experts"], ins["vs"], masks)
    got = _merged(tmp_path / "out")
    # entries whose saliency is within float32 rounding of theta may fall either way
    near = {n: torch.zeros_like(ins["base"][n], dtype=torch.bool) for n in ins["base"]}
    for t, e in enumerate(ins["experts"]):
        for n in near:
            s = ins["vs"][t][n] * (e[n] - ins["base"][n]) ** 2
            near[n] |= (s / theta - 1).abs() < 1e-5
    n_near = sum(int(x.sum()) for x in near.values())
    assert n_near < 10
    for n in want:
        ok = torch.isclose(got[n], want[n], atol=1e-6, rtol=1e-5) | near[n]
        assert ok.all(), n
    for e, m in zip(report.experts, masks):
        kept = sum(int(x.sum()) for x in m.values())
        assert abs(e.kept - kept) <= n_near
    _load_ok(tmp_path / "out")


def test_ota_global_density_matches_exact_topk(ins, tmp_path):
    report = merge(_recipe(ins, "ota", density=0.3), tmp_path / "out", quiet=True)
    masks = ref.ffg_masks_density(ins["base"], ins["experts"], ins["vs"], 0.3)
    want = ref.ota(ins["base"], ins["experts"], ins["vs"], masks)
    got = _merged(tmp_path / "out")
    total = sum(x.numel() for x in want.values())
    differing = sum(int((~torch.isclose(got[n], want[n], atol=1e-6, rtol=1e-5)).sum()) for n in want)
    # the histogram threshold is a bin edge of 1/1024 octave: only entries at the boundary may differ
    assert differing <= 0.001 * total
    for e in report.experts:
        assert abs(e.density - 0.3) <= 0.001
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["experts"][0]["density"] == pytest.approx(report.experts[0].density)
    assert len(saved["tensor_density"]) == len(want)


def test_ota_without_ffg_and_magnitude_ablation(ins, tmp_path):
    merge(_recipe(ins, "ota", graft=False), tmp_path / "nograft", quiet=True)
    ones = [{n: torch.ones_like(x, dtype=torch.bool) for n, x in ins["base"].items()} for _ in ins["experts"]]
    _close(_merged(tmp_path / "nograft"), ref.ota(ins["base"], ins["experts"], ins["vs"], ones))

    report = merge(_recipe(ins, "ota", density=0.5, score="magnitude"), tmp_path / "mag", quiet=True)
    masks = ref.ffg_masks_density(ins["base"], ins["experts"], ins["vs"], 0.5, score="magnitude")
    want = ref.ota(ins["base"], ins["experts"], ins["vs"], masks)
    got = _merged(tmp_path / "mag")
    total = sum(x.numel() for x in want.values())
    assert sum(int((~torch.isclose(got[n], want[n], atol=1e-6, rtol=1e-5)).sum()) for n in want) <= 0.001 * total
    assert all(abs(e.density - 0.5) <= 0.001 for e in report.experts)


def test_ota_per_tensor_density(ins, tmp_path):
    report = merge(_recipe(ins, "ota", density=0.25, per_tensor=True), tmp_path / "out", quiet=True)
    for densities in report.tensor_density.values():
        assert all(abs(d - 0.25) < 0.02 for d in densities)


def test_per_model_density_overrides(ins, tmp_path):
    recipe = _recipe(ins, "ota", density=0.5)
    recipe["models"] = [{"model": ins["paths"][0], "parameters": {"density": 0.1}}, ins["paths"][1]]
    report = merge(recipe, tmp_path / "out", quiet=True)
    assert abs(report.experts[0].density - 0.1) <= 0.001
    assert abs(report.experts[1].density - 0.5) <= 0.001


def test_fisher_matches_reference(ins, tmp_path):
    merge(_recipe(ins, "fisher"), tmp_path / "out", quiet=True)
    _close(_merged(tmp_path / "out"), ref.fisher(ins["experts"], ins["vs"]), atol=1e-5)


def test_fisher_needs_no_base(ins, tmp_path):
    merge({"method": "fisher", "models": ins["paths"][:2]}, tmp_path / "out", quiet=True)
    _close(_merged(tmp_path / "out"), ref.fisher(ins["experts"][:2], ins["vs"][:2]), atol=1e-5)
    _load_ok(tmp_path / "out")


def test_linear_task_arithmetic_ties_match_reference(ins, tmp_path):
    merge(_recipe(ins, "linear"), tmp_path / "lin", quiet=True)
    _close(_merged(tmp_path / "lin"), ref.linear(ins["experts"]))
    merge(_recipe(ins, "task_arithmetic", **{"lambda": 0.7}), tmp_path / "ta", quiet=True)
    _close(_merged(tmp_path / "ta"), ref.task_arithmetic(ins["base"], ins["experts"], 0.7))
    merge(_recipe(ins, "ties", density=0.3, **{"lambda": 1.2}), tmp_path / "ties", quiet=True)
    _close(_merged(tmp_path / "ties"), ref.ties(ins["base"], ins["experts"], 0.3, 1.2))
    _load_ok(tmp_path / "ties")


def test_dare_statistics_and_determinism(ins, tmp_path):
    merge(_recipe(ins, "dare", drop_rate=0.6, seed=3), tmp_path / "a", quiet=True)
    merge(_recipe(ins, "dare", drop_rate=0.6, seed=3), tmp_path / "b", quiet=True)
    merge(_recipe(ins, "dare", drop_rate=0.6, seed=4), tmp_path / "c", quiet=True)
    a, b, c = _merged(tmp_path / "a"), _merged(tmp_path / "b"), _merged(tmp_path / "c")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    # each entry is w0 + sum_t B_t d_t / (1 - q): check against the experts' possible sums
    base = ins["base"][name]
    d = [e[name] - base for e in ins["experts"]]
    got = a[name] - base
    best = torch.full_like(got, float("inf"))
    for keep in range(8):
        combo = sum(d[t] * ((keep >> t) & 1) for t in range(3)) / 0.4
        best = torch.minimum(best, (got - combo).abs())
    assert best.max() < 1e-5
    _load_ok(tmp_path / "a")


def test_output_dtype_sharding_and_side_files(ins, tmp_path):
    out = tmp_path / "out"
    merge({**_recipe(ins, "linear"), "dtype": "bfloat16", "options": {"shard_size": "100KB"}}, out, quiet=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    assert (out / "generation_config.json").is_file() and (out / "ota_merge.yaml").is_file()
    got = _merged(out)
    want = ref.linear(ins["experts"])
    for n in want:
        assert_close(got[n], want[n].to(torch.bfloat16).to(torch.float64))
    # tied embeddings: lm_head is not written (the base does not store it)
    assert "lm_head.weight" not in index["weight_map"]
    _load_ok(out)


def test_recipe_yaml_round_trip(ins, tmp_path):
    from ota_trainer import MergeRecipe

    r = MergeRecipe.from_dict(_recipe(ins, "ota", density=0.2, power=1.0))
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert MergeRecipe.from_yaml(p) == r
    merge(p, tmp_path / "out", quiet=True)
    written = MergeRecipe.from_yaml(tmp_path / "out" / "ota_merge.yaml")  # pinned: every value used, spelled out
    assert written.method_parameters() == {**r.method_parameters(), "density": 0.2}
    assert [written.model_parameters(i) for i in range(3)] == [r.model_parameters(i) for i in range(3)]


def _weights(out):
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}


def test_written_recipe_pins_every_default_and_reproduces_the_bytes(ins, tmp_path):
    import yaml

    from ota_trainer import __version__
    from ota_trainer.cli.merge import main as merge_main

    recipe = {"method": "ota", "base_model": ins["base_path"], "models": ins["paths"]}
    merge(recipe, tmp_path / "first", quiet=True)  # every parameter at its default
    pinned = yaml.safe_load((tmp_path / "first" / "ota_merge.yaml").read_text())
    assert pinned["parameters"]["saliency_share"] == 0.99 and pinned["parameters"]["power"] == 0.5
    assert pinned["parameters"]["graft"] is True and pinned["parameters"]["score"] == "fisher"
    assert pinned["parameters"]["elect_sign"] is False and "density" not in pinned["parameters"]
    assert pinned["ota_trainer_version"] == __version__
    # mergekit's positional form, with the written recipe: the same bytes
    assert merge_main([str(tmp_path / "first" / "ota_merge.yaml"), str(tmp_path / "again"), "-q"]) == 0
    assert _weights(tmp_path / "again") == _weights(tmp_path / "first")
    card = (tmp_path / "again" / "README.md").read_text()
    assert "`ota-merge ota_merge.yaml merged/`" in card and f"ota_trainer=={__version__}" in card
    assert "saliency_share: 0.99" in card and "elect_sign: false" in card  # the card shows the pinned recipe


def test_card_tags_and_base_model_of_local_folders(tiny_models, tmp_path):
    import json as _json

    import yaml

    m = tiny_models
    base = tmp_path / "base"  # a local copy of a Hub model names its repo in config.json
    import shutil

    shutil.copytree(m["base"], base)
    cfg = _json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(_json.dumps({**cfg, "_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    rec = {"base_model": str(base), "models": [str(m["e1"]), str(m["e2"])]}
    merge({**rec, "method": "ties"}, tmp_path / "ties", quiet=True)
    front = yaml.safe_load((tmp_path / "ties" / "README.md").read_text().split("---")[1])
    assert front["base_model"] == ["HuggingFaceTB/SmolLM2-135M"] and front["base_model_relation"] == "merge"
    assert "ota" not in front["tags"] and {"merge", "ties", "ota_trainer"} <= set(front["tags"])
    merge({**rec, "method": "ota"}, tmp_path / "ota", quiet=True)
    front = yaml.safe_load((tmp_path / "ota" / "README.md").read_text().split("---")[1])
    assert "ota" in front["tags"]


def test_missing_moments_report_says_ffg_was_not_applied(bf16_models, tmp_path, caplog):
    import logging

    m = bf16_models
    recipe = {
        "method": "ota",
        "base_model": str(m["base"]),
        "models": [str(m["e1"]), str(m["e3"])],  # e3 has no moments
        "options": {"allow_missing_moments": True},
    }
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        report = merge(recipe, tmp_path / "out", quiet=True)
    assert report.experts[0].grafted and 0 < report.experts[0].density < 1
    assert not report.experts[1].grafted and report.experts[1].no_moments
    assert "keeps 0.0000 of 0 entries" not in caplog.text and "no moments: FFG is not applied" in caplog.text
    card = (tmp_path / "out" / "README.md").read_text()
    assert "no moments: FFG not applied, every edit kept" in card


def test_ota_saliency_share_rule(ins, tmp_path):
    report = merge(_recipe(ins, "ota", saliency_share=0.9), tmp_path / "out", quiet=True)
    for t, e in enumerate(report.experts):
        assert e.grafted and e.saliency_share == 0.9
        s = torch.cat(
            [(ins["vs"][t][n] * (ins["experts"][t][n] - ins["base"][n]) ** 2).reshape(-1) for n in ins["base"]]
        )
        top = torch.sort(s, descending=True).values
        needed = int((torch.cumsum(top, 0) < 0.9 * s.sum()).sum()) + 1  # fewest entries holding 90% of the saliency
        assert abs(e.kept - needed) <= 0.001 * s.numel()
