"""LoRA / PEFT adapters as merge experts (#17): real PEFT adapters of a tiny Llama, merged as the
full experts they stand for (``W0 + scale * B A``), checked against PEFT's own merge_and_unload."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from pagecache import resident_share
from safetensors.torch import load_file

from ota_trainer import ConfigError, FormatError, IncompatibleModelsError, MissingMomentsError, merge
from ota_trainer.merger import ffg_cache
from ota_trainer.testing.tiny import make_tiny_base, make_tiny_expert

peft = pytest.importorskip("peft")


def _adapter(base: Path, out: Path, seed: int, **lora) -> Path:
    """A LoRA adapter of ``base`` with random (non-zero) factors, saved by PEFT; and its
    merge_and_unload'ed full model beside it (``out.with_name(out.name + '_full')``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **lora)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(out)
    full = out.with_name(out.name + "_full")
    pm.merge_and_unload().save_pretrained(full)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_base(root / "base", seed=0)
    a1 = _adapter(base, root / "a1", 1)
    a2 = _adapter(base, root / "a2", 2, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 16})
    return {"root": root, "base": base, "a1": a1, "a2": a2}


def _add_moments(adapter: Path, base: Path, seed: int) -> None:
    """Moments as a LoRA capture stores them: keyed by the adapted base weights' names."""
    from ota_trainer import save_moments
    from ota_trainer.merger.adapters import open_adapter

    g = torch.Generator().manual_seed(seed)
    w = _weights(base)
    mods = open_adapter(adapter).modules
    moments = {n: torch.rand(w[n].shape, generator=g) * 1e-6 + 1e-9 for n in mods}
    save_moments(
        adapter, moments, compression="rank1", metadata={"optimizer": "adamw_torch", "beta2": 0.999, "step": 10}
    )


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare"])
def test_adapters_merge_as_their_merged_full_models(lora, tmp_path, method):
    """Every method on two adapters gives what it gives on PEFT's merge_and_unload of each."""
    recipe = {"method": method, "base_model": str(lora["base"])}
    merge({**recipe, "models": [str(lora["a1"]), str(lora["a2"])]}, tmp_path / "adapters", quiet=True)
    full = [str(lora["a1"].with_name("a1_full")), str(lora["a2"].with_name("a2_full"))]
    merge({**recipe, "models": full}, tmp_path / "full", quiet=True)
    got, want = _weights(tmp_path / "adapters"), _weights(tmp_path / "full")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
    assert not list(tmp_path.glob(".*ota-adapters*"))  # the working folder is gone


def test_ota_on_adapters_keeps_the_base_where_no_adapter_edits(lora, tmp_path):
    for i, key in enumerate(("a1", "a2")):
        shutil.copytree(lora[key], tmp_path / key)
        _add_moments(tmp_path / key, lora["base"], i)
    models = [str(tmp_path / "a1"), str(tmp_path / "a2")]
    recipe = {"method": "ota", "base_model": str(lora["base"]), "models": models, "parameters": {"density": 0.4}}
    report = merge(recipe, tmp_path / "out", quiet=True)
    got, base = _weights(tmp_path / "out"), _weights(lora["base"])
    adapted = [k for k in base if any(m in k for m in ("q_proj", "v_proj", "down_proj"))]
    assert adapted and all(not torch.equal(got[k], base[k]) for k in adapted)
    for k in base:
        if k not in adapted:
            assert torch.equal(got[k], base[k]), k  # no edit: FFG keeps nothing, OTA keeps the base
    # the density counts the adapted weights alone (the rest is no edit): 0.4 of those is kept
    adapted_entries = sum(base[k].numel() for k in adapted)
    for e in report.experts:
        assert e.total == adapted_entries and e.density == pytest.approx(0.4, abs=0.01)
    torch_report = merge(recipe, tmp_path / "torch", quiet=True, fast_path=False)  # the PyTorch backend: same
    assert [e.kept for e in torch_report.experts] == [e.kept for e in report.experts]
    assert (tmp_path / "torch" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "model.safetensors"
    ).read_bytes()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_full_experts_and_adapters_mix(lora, tiny_models, tmp_path):
    """A full fine-tuned expert and an adapter in one merge; the base named by the adapter's
    config when the recipe gives none."""
    full = make_tiny_expert(lora["base"], tmp_path / "full", seed=5)
    shutil.copytree(lora["a1"], tmp_path / "a1")
    _add_moments(tmp_path / "a1", lora["base"], 7)
    cfg = json.loads((tmp_path / "a1" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(lora["base"])
    from ota_trainer.cli.merge import main

    assert (
        main(["--expert", str(full), str(tmp_path / "a1"), "--method", "ota", "--out", str(tmp_path / "o"), "-q"]) == 0
    )
    got, base, f = _weights(tmp_path / "o"), _weights(lora["base"]), _weights(full)
    k = "model.layers.0.mlp.up_proj.weight"  # edited by the full expert only: its edits, where kept
    assert not torch.equal(got[k], base[k]) and torch.isclose(got[k], f[k]).any()


def test_ffg_histograms_of_full_experts_are_cached_not_those_of_adapters(lora, tmp_path, monkeypatch, caplog):
    """An adapter's expert is materialised afresh for every merge (new files): its histogram is
    counted each time and never cached; the full expert beside it comes from the cache the second time."""
    monkeypatch.setenv("OTA_TRAINER_FFG_CACHE", "1")
    monkeypatch.setenv("OTA_TRAINER_CACHE", str(tmp_path / "cache"))
    full = make_tiny_expert(lora["base"], tmp_path / "full", seed=5)
    shutil.copytree(lora["a1"], tmp_path / "a1")
    _add_moments(tmp_path / "a1", lora["base"], 7)
    monkeypatch.setattr(ffg_cache, "RACY_S", 0.0)  # (else the adapter's fresh files alone keep it out)
    recipe = {"method": "ota", "base_model": str(lora["base"]), "models": [str(full), str(tmp_path / "a1")]}
    merge(recipe, tmp_path / "o1", quiet=True)
    assert len(list((tmp_path / "cache" / "ffg").glob("*.hist"))) == 1
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        merge(recipe, tmp_path / "o2", quiet=True)
    assert (
        caplog.text.count("FFG histogram from the cache") == 1
        and f"{full}: FFG histogram from the cache" in caplog.text
    )
    a, b = _weights(tmp_path / "o1"), _weights(tmp_path / "o2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_adapters_expert_writes_its_adapted_weights_alone_and_reads_the_rest_from_the_base(lora, tmp_path):
    """The expert an adapter stands for: its adapted weights W0 + scale * B A in the work folder
    (PEFT's merge_and_unload values), every other tensor the base's own bytes, read in place."""
    from ota_trainer.io.checkpoint import ModelFolder
    from ota_trainer.merger.adapters import AdapterExperts
    from ota_trainer.merger.inputs import open_model
    from ota_trainer.merger.report import local_resolver

    experts = AdapterExperts(local_resolver, str(lora["base"]), tmp_path / "work")
    layout = experts(str(lora["a1"]))
    base, full = open_model(lora["base"]), _weights(lora["a1"].with_name("a1_full"))
    adapted = experts.edited[str(lora["a1"])]
    assert adapted and set(layout.names) == set(base.names)
    work = [p for p in (tmp_path / "work").rglob("*.safetensors") if p.parent.name != "ota"]
    written = sum(p.stat().st_size for p in work)
    assert written < sum(base.tensors[n].numel * 4 for n in adapted) + 4096  # the adapted fp32 weights, no more
    # written through the page cache, where the merge reads them next (not to the disk and back)
    assert work and all(resident_share(p) == 1.0 for p in work)
    folder = ModelFolder(layout)
    try:
        for n in base.names:
            if n in adapted:
                assert layout.file(n).is_relative_to(tmp_path / "work")
                torch.testing.assert_close(folder.get(n), full[n], atol=1e-6, rtol=1e-6, msg=n)
            else:
                assert layout.file(n) == base.file(n) and layout.tensors[n].start == base.tensors[n].start, n
    finally:
        folder.close()
        experts.cleanup()


def test_adapter_without_moments_is_an_expert_without_moments(lora, tmp_path):
    recipe = {"method": "ota", "base_model": str(lora["base"]), "models": [str(lora["a1"]), str(lora["a2"])]}
    with pytest.raises(MissingMomentsError):
        merge(recipe, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*ota-adapters*"))
    merge({**recipe, "options": {"allow_missing_moments": True}}, tmp_path / "out", quiet=True)


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"use_dora": True}, ConfigError, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, ConfigError, "modules_to_save"),
        ({"bias": "all"}, ConfigError, "biases"),
        ({"peft_type": "IA3"}, ConfigError, "only LoRA"),
        ({"r": 0}, FormatError, "r=0"),
        ({"r": 8}, FormatError, "rank 4"),
    ],
)
def test_adapters_we_do_not_merge_are_refused_by_name(lora, tmp_path, change, error, words):
    bad = tmp_path / "bad"
    shutil.copytree(lora["a1"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(error, match=words):
        merge({"method": "linear", "base_model": str(lora["base"]), "models": [str(bad)]}, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_model_is_refused(lora, tmp_path):
    other = make_tiny_base(tmp_path / "wide", seed=0, hidden=96)
    with pytest.raises(IncompatibleModelsError, match="another model"):
        merge({"method": "linear", "base_model": str(other), "models": [str(lora["a1"])]}, tmp_path / "out", quiet=True)
    assert not list(tmp_path.glob(".*ota-adapters*")) and not (tmp_path / "out").exists()


def test_adapters_from_repo_ids(local_hub, lora, tmp_path):
    from ota_trainer.hub import publish_folder

    publish_folder(lora["base"], "org/base")
    publish_folder(lora["a1"], "org/a1")
    publish_folder(lora["a2"], "org/a2")
    from ota_trainer.cli.merge import main

    assert (
        main(
            [
                "--base",
                "org/base",
                "--expert",
                "org/a1",
                "org/a2",
                "--method",
                "ties",
                "--out",
                str(tmp_path / "hub"),
                "-q",
            ]
        )
        == 0
    )
    merge(
        {"method": "ties", "base_model": str(lora["base"]), "models": [str(lora["a1"]), str(lora["a2"])]},
        tmp_path / "local",
        quiet=True,
    )
    a, b = _weights(tmp_path / "hub"), _weights(tmp_path / "local")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_adapters_from_repo_ids_merge_offline_from_the_cache(local_hub, lora, tmp_path, monkeypatch):
    """Offline, an adapter repo's missing config.json in the cache means "an adapter" (its
    adapter_config.json is cached), as online a missing config.json in the repo does."""
    from huggingface_hub import constants

    from ota_trainer.cli.merge import main
    from ota_trainer.hub import publish_folder

    publish_folder(lora["base"], "org/base")
    publish_folder(lora["a1"], "org/a1")
    publish_folder(lora["a2"], "org/a2")
    args = ["--base", "org/base", "--expert", "org/a1", "org/a2", "--method", "ties", "-q"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert main([*args, "--out", str(tmp_path / "online")]) == 0  # fills the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    local_hub.requests.clear()
    assert main([*args, "--out", str(tmp_path / "offline")]) == 0
    assert local_hub.requests == []
    a, b = _weights(tmp_path / "online"), _weights(tmp_path / "offline")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_checks_adapters_against_the_base(lora, tmp_path, capsys):
    from ota_trainer.cli.merge import main

    args = ["--expert", str(lora["a1"]), str(lora["a2"]), "--method", "ties", "--dry-run", "-q"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0  # the base comes from the adapters' config
    out = capsys.readouterr().out
    assert "2 LoRA adapter(s) against the base" in out and not (tmp_path / "o").exists()
    other = make_tiny_base(tmp_path / "wide", seed=0, hidden=96)
    assert main([*args, "--base", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "an adapter of another model" in capsys.readouterr().err


def test_push_expert_publishes_an_adapter_with_its_moments_and_refuses_factor_moments(local_hub, lora, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    from ota_trainer import push_expert, save_moments

    good = tmp_path / "good"
    shutil.copytree(lora["a1"], good)
    _add_moments(good, lora["base"], 3)
    push_expert(good, "org/lora-good")
    assert {"adapter_config.json", "adapter_model.safetensors", "ota/moments.safetensors"} <= set(
        HfApi().list_repo_files("org/lora-good")
    )
    assert "ota-merge-ready" in ModelCard.load("org/lora-good").data.tags
    bad = tmp_path / "bad"  # what a capture without LoRA support stored: the factors' own moments
    shutil.copytree(lora["a1"], bad)
    f = load_file(str(bad / "adapter_model.safetensors"))
    save_moments(
        bad, {k: torch.rand_like(v) for k, v in f.items()}, compression="full", metadata={"step": 1, "beta2": 0.999}
    )
    with pytest.raises(IncompatibleModelsError, match="adapter's own factors"):
        push_expert(bad, "org/lora-bad")
    with pytest.raises(MissingMomentsError):
        push_expert(lora["a2"], "org/lora-none")


def test_out_adapter_rank_writes_the_merged_edit_as_a_lora_adapter(lora, tmp_path):
    """``--out-adapter-rank``: adapter/ holds B A = the best rank-r approximation of each adapted
    module's merged edit; at a rank that holds the whole edit, PEFT's merge of it onto the base
    is the merged model; at a lower one, the reported error is the adapter's real error."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ota_trainer.cli.merge import main

    experts = [str(lora["a1"]), str(lora["a2"])]
    args = ["--base", str(lora["base"]), "--expert", *experts, "--method", "linear", "-q"]
    assert main([*args, "--out", str(tmp_path / "r8"), "--out-adapter-rank", "8"]) == 0
    report = json.loads((tmp_path / "r8" / "ota_merge_report.json").read_text())["adapter"]
    assert report["rank"] == 8 and report["rel_error"] < 1e-5 and len(report["modules"]) == 3 * 2
    assert report["modules"]["model.layers.0.self_attn.v_proj.weight"]["rank"] == 6  # 4 + rank_pattern 2
    cfg = json.loads((tmp_path / "r8" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == str(lora["base"])
    base = AutoModelForCausalLM.from_pretrained(lora["base"], dtype=torch.float32)
    rebuilt = PeftModel.from_pretrained(base, tmp_path / "r8" / "adapter").merge_and_unload().state_dict()
    merged = _weights(tmp_path / "r8")
    for k, v in merged.items():
        torch.testing.assert_close(rebuilt[k], v, atol=2e-6, rtol=1e-5, msg=k)
    # rank 2: the error the report gives is the adapter's, and no rank-2 factor pair does better
    assert main([*args, "--out", str(tmp_path / "r2"), "--out-adapter-rank", "2"]) == 0
    report = json.loads((tmp_path / "r2" / "ota_merge_report.json").read_text())["adapter"]
    ad, w0 = load_file(str(tmp_path / "r2" / "adapter" / "adapter_model.safetensors")), _weights(lora["base"])
    for name, got in report["modules"].items():
        mod = name[: -len(".weight")]
        edit = merged[name] - w0[name]
        ba = ad[f"base_model.model.{mod}.lora_B.weight"] @ ad[f"base_model.model.{mod}.lora_A.weight"]
        err = float((edit - ba).norm() / edit.norm())
        assert got["rank"] == 2 and err == pytest.approx(got["rel_error"], rel=1e-3) and err > 0.05
        u, s, vh = torch.linalg.svd(edit.double())
        other = (u[:, 1:3] * s[1:3]) @ vh[1:3]  # another rank-2 approximation: worse
        assert float((edit - other).norm() / edit.norm()) > err


def test_out_adapter_rank_errors_and_mixed_experts(lora, tmp_path, caplog):
    import logging

    from ota_trainer.merger.recipe import MergeRecipe

    for bad in (0, True, "4", 1.5):
        with pytest.raises(ConfigError, match="out_adapter_rank"):
            MergeRecipe.from_dict(
                {"method": "linear", "models": ["a", "b"], "options": {"out_adapter_rank": bad}, "base_model": "x"}
            )
    full = make_tiny_expert(lora["base"], tmp_path / "full", seed=5)
    recipe = {"method": "linear", "base_model": str(lora["base"]), "options": {"out_adapter_rank": 4}}
    with pytest.raises(ConfigError, match="no expert is a LoRA adapter"):
        merge({**recipe, "models": [str(full)]}, tmp_path / "none", quiet=True)
    assert not (tmp_path / "none").exists()
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        report = merge({**recipe, "models": [str(full), str(lora["a1"])]}, tmp_path / "mixed", quiet=True)
    assert report.adapter["rank"] == 4 and (tmp_path / "mixed" / "adapter" / "adapter_model.safetensors").is_file()
    assert "full fine-tuned experts' edits of other weights" in caplog.text
    assert "adapter/adapter_config.json" in report.files


def test_fisher_on_adapters_keeps_the_base_as_anchor(lora, tmp_path):
    """Fisher has no base, yet on adapters the weights no adapter edits stay the base's (each
    materialised expert holds W0 there), and each adapted weight is a curvature-weighted average
    of the experts' W0 + scale B A: between the two, and not their plain mean."""
    for i, key in enumerate(("a1", "a2")):
        shutil.copytree(lora[key], tmp_path / key)
        _add_moments(tmp_path / key, lora["base"], i)
    models = [str(tmp_path / "a1"), str(tmp_path / "a2")]
    merge({"method": "fisher", "base_model": str(lora["base"]), "models": models}, tmp_path / "f", quiet=True)
    merge({"method": "linear", "base_model": str(lora["base"]), "models": models}, tmp_path / "l", quiet=True)
    got, mean, base = _weights(tmp_path / "f"), _weights(tmp_path / "l"), _weights(lora["base"])
    w1, w2 = _weights(lora["root"] / "a1_full"), _weights(lora["root"] / "a2_full")
    adapted = [k for k in base if any(m in k for m in ("q_proj", "v_proj", "down_proj"))]
    for k in base:
        if k in adapted:
            lo, hi = torch.minimum(w1[k], w2[k]), torch.maximum(w1[k], w2[k])
            assert bool(((got[k] >= lo - 1e-6) & (got[k] <= hi + 1e-6)).all()), k
            assert not torch.allclose(got[k], mean[k], atol=1e-6), k  # the curvature had a say
        else:
            torch.testing.assert_close(got[k], base[k], atol=0, rtol=1e-6, msg=k)


def test_an_adapted_weight_without_moments_is_missing_not_zero_curvature(lora, tmp_path):
    """Moments covering only some of the adapted weights (e.g. a capture that had no estimator
    for some layers): the others are missing moments (an error naming them, or uniform curvature
    with allow_missing_moments), never zero curvature, which would have FFG revert every edit."""
    from ota_trainer import save_moments
    from ota_trainer.merger.adapters import open_adapter

    shutil.copytree(lora["a1"], tmp_path / "a1")
    w = _weights(lora["base"])
    mods = [n for n in open_adapter(tmp_path / "a1").modules if "q_proj" in n]
    save_moments(
        tmp_path / "a1",
        {n: torch.rand(w[n].shape) * 1e-6 + 1e-9 for n in mods},
        compression="rank1",
        metadata={"optimizer": "adamw_torch", "beta2": 0.999, "step": 10},
    )
    recipe = {"method": "ota", "base_model": str(lora["base"]), "models": [str(tmp_path / "a1")]}
    with pytest.raises(MissingMomentsError, match="v_proj"):
        merge(recipe, tmp_path / "out", quiet=True)
    merge({**recipe, "options": {"allow_missing_moments": True}}, tmp_path / "out", quiet=True)
    got, base = _weights(tmp_path / "out"), _weights(lora["base"])
    k = "model.layers.0.self_attn.v_proj.weight"
    assert (got[k] != base[k]).float().mean() > 0.2  # uniform curvature: FFG keeps a share of the edit
