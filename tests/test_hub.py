"""Hub round trip against the loopback Hub with the real huggingface_hub client (no mocks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ota_trainer import MissingMomentsError, merge
from ota_trainer.cli.merge import main as merge_main
from ota_trainer.testing.pytest_fixtures import hub_env
from ota_trainer.testing.tiny import make_tiny_base, make_tiny_expert, make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "merge_from_hub.py"


def _tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubtiny")
    base = make_tiny_base(root / "base", seed=0)
    make_tiny_tokenizer(base)
    e1 = make_tiny_expert(base, root / "e1", seed=1)
    e2 = make_tiny_expert(base, root / "e2", seed=2)
    return {"base": base, "e1": e1, "e2": e2, "root": root}


def _publish(tiny):
    from ota_trainer.hub import publish_folder, push_expert

    publish_folder(tiny["base"], "org/base")
    push_expert(tiny["e1"], "org/e1")
    push_expert(tiny["e2"], "org/e2")


def _merge_args(out, *extra):
    return [
        "--base",
        "org/base",
        "--expert",
        "org/e1",
        "--expert",
        "org/e2",
        "--density",
        "0.4",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def test_merge_from_repo_ids_equals_local_merge_and_publishes(local_hub, tiny, tmp_path, capsys):
    from huggingface_hub import HfApi, ModelCard

    _publish(tiny)
    assert merge_main(_merge_args(tmp_path / "hub_merge", "--push-to-hub", "org/merged")) == 0
    merge(
        {
            "method": "ota",
            "base_model": str(tiny["base"]),
            "models": [str(tiny["e1"]), str(tiny["e2"])],
            "parameters": {"density": 0.4},
        },
        tmp_path / "local_merge",
        quiet=True,
    )
    a, b = _tensors(tmp_path / "hub_merge"), _tensors(tmp_path / "local_merge")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    files = set(HfApi().list_repo_files("org/merged"))
    assert {
        "model.safetensors",
        "config.json",
        "README.md",
        "ota_merge.yaml",
        "ota_merge_report.json",
        "tokenizer.json",
    } <= files
    card = ModelCard.load("org/merged")
    assert {"merge", "ota"} <= set(card.data.tags)
    assert card.data.base_model == ["org/base", "org/e1", "org/e2"]
    sha = HfApi().model_info("org/e1").sha
    assert sha in card.text  # every source's resolved commit is on the card
    report = json.loads((tmp_path / "hub_merge" / "ota_merge_report.json").read_text())
    assert report["sources"]["org/e1"] == sha
    assert all(abs(e["density"] - 0.4) < 0.001 for e in report["experts"])
    from transformers import AutoModelForCausalLM

    pulled = AutoModelForCausalLM.from_pretrained("org/merged")
    for name, t in pulled.state_dict().items():
        if name in a:
            assert torch.equal(t, a[name]), name


def test_revisions_are_pinned_to_commit_shas(local_hub, tiny, tmp_path):
    from huggingface_hub import HfApi

    _publish(tiny)
    first = HfApi().model_info("org/e2").sha
    push_again = tmp_path / "e2b"
    shutil.copytree(tiny["e2"], push_again)
    (push_again / "notes.txt").write_text("second commit")
    from ota_trainer.hub import publish_folder

    publish_folder(push_again, "org/e2")
    args = [
        "--base",
        "org/base",
        "--expert",
        "org/e1",
        "--expert",
        f"org/e2@{first}",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert merge_main(args) == 0
    report = json.loads((tmp_path / "out" / "ota_merge_report.json").read_text())
    assert report["sources"][f"org/e2@{first}"] == first


def test_dry_run_downloads_nothing(local_hub, tiny, tmp_path, capsys):
    _publish(tiny)
    local_hub.requests.clear()
    assert merge_main(_merge_args(tmp_path / "out", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "org/e1 ->" in out and "ota/moments.safetensors" in out and "estimated peak memory" in out
    assert "architectures agree" in out and "once they are downloaded" in out  # configs only, so far
    assert not (tmp_path / "out").exists()
    from huggingface_hub import constants

    # only safetensors headers were read (ranged GETs for the memory estimate): nothing in the cache
    assert list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors")) == []
    assert len([p for m, p in local_hub.requests if m == "GET" and p.endswith(".safetensors")]) <= 1


def test_unknown_repo_and_revision(local_hub, tiny, tmp_path, capsys):
    _publish(tiny)
    assert merge_main(["--base", "org/base", "--expert", "org/nope", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "org/nope: repository not found" in capsys.readouterr().err
    assert merge_main(["--base", "org/base", "--expert", "org/e1@v9", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "revision 'v9' not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_repo_without_moments_says_how_to_make_them(local_hub, tiny, tmp_path, capsys):
    from ota_trainer.hub import publish_folder

    _publish(tiny)
    plain = tmp_path / "plain"
    shutil.copytree(tiny["e1"], plain, ignore=shutil.ignore_patterns("ota"))
    publish_folder(plain, "org/plain")
    assert merge_main(["--base", "org/base", "--expert", "org/plain", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "OTACallback" in err and "linear, task_arithmetic, ties, dare" in err
    assert (
        merge_main(
            ["--base", "org/base", "--expert", "org/plain", "--method", "ties", "--out", str(tmp_path / "o"), "--quiet"]
        )
        == 0
    )


def test_architecture_mismatch_fails_before_any_weights_download(local_hub, tiny, tmp_path, capsys):
    from ota_trainer.hub import publish_folder

    _publish(tiny)
    other = tmp_path / "other"
    shutil.copytree(tiny["e1"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MistralForCausalLM"], "mistral"
    (other / "config.json").write_text(json.dumps(cfg))
    publish_folder(other, "org/other")
    local_hub.requests.clear()
    assert (
        merge_main(
            [
                "--base",
                "org/base",
                "--expert",
                "org/e1",
                "--expert",
                "org/other",
                "--out",
                str(tmp_path / "o"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "MistralForCausalLM" in capsys.readouterr().err
    assert [p for m, p in local_hub.requests if m == "GET" and p.endswith(".safetensors")] == []


def test_transient_errors_are_retried(local_hub, tiny, tmp_path):
    _publish(tiny)
    local_hub.inject_faults(status=503, times=2, path_contains="moments.safetensors")
    local_hub.inject_faults(drop_after_bytes=1000, times=1, path_contains="e2/resolve")
    assert merge_main(_merge_args(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_persistent_errors_fail_cleanly(local_hub, tiny, tmp_path, capsys):
    _publish(tiny)
    local_hub.inject_faults(status=500, times=100, path_contains="e2/resolve")
    assert merge_main(_merge_args(tmp_path / "out")) == 2
    assert "org/e2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_offline_uses_the_cache_and_fails_clearly_without_it(local_hub, tiny, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    _publish(tiny)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert merge_main(_merge_args(tmp_path / "o1")) == 2
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert merge_main(_merge_args(tmp_path / "o2")) == 0  # fills the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    local_hub.requests.clear()
    assert merge_main(_merge_args(tmp_path / "o3")) == 0
    assert local_hub.requests == []
    assert _tensors(tmp_path / "o2").keys() == _tensors(tmp_path / "o3").keys()


@pytest.mark.local_hub(token="sekret")
def test_private_repo_needs_a_token(local_hub, tiny, tmp_path):
    from ota_trainer.hub import publish_folder, push_expert

    publish_folder(tiny["base"], "org/base", private=True)
    push_expert(tiny["e1"], "org/e1", private=True)
    push_expert(tiny["e2"], "org/e2", private=True)
    env = hub_env(local_hub, tmp_path / "home_no_token")  # no HF_TOKEN
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *_merge_args(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "set HF_TOKEN" in r.stderr and r.stderr.count("\n") == 1
    env = hub_env(local_hub, tmp_path / "home_token", token="sekret")
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *_merge_args(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr


def test_push_expert_validates_moments_first(local_hub, tiny, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    from ota_trainer.hub import push_expert

    bad = tmp_path / "bad"
    shutil.copytree(tiny["e1"], bad)
    shutil.rmtree(bad / "ota")
    with pytest.raises(MissingMomentsError, match="OTACallback"):
        push_expert(bad, "org/bad")
    assert not HfApi().repo_exists("org/bad")
    sha = push_expert(tiny["e1"], "org/good", base_model="org/base")
    info = HfApi().model_info("org/good")
    assert info.sha == sha and "ota/moments.safetensors" in [s.rfilename for s in info.siblings]
    card = ModelCard.load("org/good")
    assert {"ota-merge-ready", "ota-moments-v1"} <= set(card.data.tags) and card.data.ota_moments_format_version == 1


def test_trained_experts_pushed_by_the_trainer_merge_from_the_hub(local_hub, tmp_path):
    """The whole story: two tiny experts trained with OTACallback and push_to_hub=True, merged from their repo ids."""
    from huggingface_hub import HfApi

    from ota_trainer.cli import train_sft
    from ota_trainer.hub import publish_folder

    base = make_tiny_base(tmp_path / "base", seed=0)
    make_tiny_tokenizer(base)
    publish_folder(base, "org/tiny-base")
    for task in ("facts", "shout"):
        cfg = {
            "model": str(base),
            "dataset": {"builtin": task, "n": 16},
            "sft": {
                "output_dir": str(tmp_path / task),
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "max_length": 64,
                "use_cpu": True,
                "bf16": False,
                "gradient_checkpointing": False,
                "report_to": [],
                "save_strategy": "no",
                "push_to_hub": True,
                "hub_model_id": f"org/tiny-{task}",
                "dataloader_num_workers": 0,
            },
            "ota": {"compression": "rank1", "base_model": "org/tiny-base"},
        }
        train_sft.train(cfg)
        files = HfApi().list_repo_files(f"org/tiny-{task}")
        assert "ota/moments.safetensors" in files and "model.safetensors" in files
    env = hub_env(local_hub, tmp_path / "cli_home")
    r = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--base",
            "org/tiny-base",
            "--expert",
            "org/tiny-facts",
            "--expert",
            "org/tiny-shout",
            "--method",
            "ota",
            "--density",
            "0.4",
            "--out",
            str(tmp_path / "merged"),
            "--push-to-hub",
            "org/tiny-merged",
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM

    pulled = AutoModelForCausalLM.from_pretrained("org/tiny-merged")
    local = _tensors(tmp_path / "merged")
    assert all(torch.equal(t, local[n]) for n, t in pulled.state_dict().items() if n in local)


def test_written_recipe_pins_commits_and_reproduces_after_the_repo_moves_on(local_hub, tiny, tmp_path):
    import yaml

    from ota_trainer.hub import publish_folder

    _publish(tiny)
    assert merge_main(["--base", "org/base", "--expert", "org/e1", "org/e2", "--out", str(tmp_path / "a"), "-q"]) == 0
    pinned = yaml.safe_load((tmp_path / "a" / "ota_merge.yaml").read_text())
    from huggingface_hub import HfApi

    sha = HfApi().model_info("org/e1").sha
    assert pinned["models"][0]["model"] == f"org/e1@{sha}" and pinned["parameters"]["saliency_share"] == 0.99
    # org/e1 gets new weights: the pinned recipe still merges the commit it named
    moved = make_tiny_expert(tiny["base"], tmp_path / "e1_moved", seed=7)
    publish_folder(moved, "org/e1")
    assert HfApi().model_info("org/e1").sha != sha
    assert merge_main([str(tmp_path / "a" / "ota_merge.yaml"), str(tmp_path / "b"), "-q"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    # cached now: a dry run of the same merge runs every check
    assert (
        merge_main(
            [
                "--base",
                "org/base",
                "--expert",
                f"org/e1@{sha}",
                "org/e2",
                "--out",
                str(tmp_path / "c"),
                "--dry-run",
                "-q",
            ]
        )
        == 0
    )


def test_python_api_merges_repo_ids_like_the_cli(local_hub, tiny, tmp_path):
    """ota_trainer.merge takes Hub repo ids (pinned or not) as the CLI does; HubResolver is exported."""
    import ota_trainer

    _publish(tiny)
    recipe = {"method": "ota", "base_model": "org/base", "models": ["org/e1", "org/e2"]}
    report = ota_trainer.merge(recipe, tmp_path / "api", quiet=True)
    assert report.sources["org/e1"] == __import__("huggingface_hub").HfApi().model_info("org/e1").sha
    local = {"method": "ota", "base_model": str(tiny["base"]), "models": [str(tiny["e1"]), str(tiny["e2"])]}
    ota_trainer.merge(local, tmp_path / "local", quiet=True)  # folders still work
    a, b = _tensors(tmp_path / "api"), _tensors(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resolver = ota_trainer.HubResolver(need_moments=False)
    ota_trainer.merge({**recipe, "method": "linear"}, tmp_path / "linear", quiet=True, resolver=resolver)
    assert (tmp_path / "linear" / "model.safetensors").is_file()
