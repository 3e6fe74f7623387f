"""The merge CLI, run as users run it: a subprocess of scripts/merge_from_hub.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "merge_from_hub.py"


def _cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_flags_merge_and_report_density(tiny_models, tmp_path):
    m = tiny_models
    r = _cli(
        "--base",
        m["base"],
        "--expert",
        m["e1"],
        "--expert",
        m["e3"],
        "--method",
        "ota",
        "--density",
        "0.4",
        "--out",
        tmp_path / "out",
    )
    assert r.returncode == 0, r.stderr
    assert "FFG kept 0.4" in r.stdout
    assert "merge (ota)" in r.stderr  # progress bar over tensors
    report = json.loads((tmp_path / "out" / "ota_merge_report.json").read_text())
    assert report["recipe"]["parameters"] == {"density": 0.4}


def test_recipe_file_equals_flags(tiny_models, tmp_path):
    m = tiny_models
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n"
        f"  - model: {m['e1']}\n    parameters: {{density: 0.3}}\n"
        f"  - model: {m['e2']}\n    parameters: {{density: 0.3}}\nparameters:\n  lambda: 0.9\n"
    )
    assert _cli("--recipe", recipe, "--out", tmp_path / "a", "--quiet").returncode == 0
    r = _cli(
        "--base",
        m["base"],
        "--expert",
        m["e1"],
        "--expert",
        m["e2"],
        "--method",
        "ties",
        "--density",
        "0.3",
        "--lambda",
        "0.9",
        "--out",
        tmp_path / "b",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_param_and_expert_param(tiny_models, tmp_path):
    m = tiny_models
    r = _cli(
        "--base",
        m["base"],
        "--expert",
        m["e1"],
        "--expert",
        m["e2"],
        "--param",
        "density=0.5",
        "--expert-param",
        "1:density=0.2",
        "--out",
        tmp_path / "out",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "ota_merge_report.json").read_text())
    assert [round(e["density"], 2) for e in report["experts"]] == [0.5, 0.2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--density", "1.5"], "density=1.5 must be in (0, 1]"),
        (["--param", "bogus=1"], "unknown parameter 'bogus'"),
        (["--expert-param", "5:density=0.1"], "expected I:KEY=VALUE"),
    ],
)
def test_errors_exit_2_with_one_line(tiny_models, tmp_path, args, message):
    m = tiny_models
    r = _cli("--base", m["base"], "--expert", m["e1"], *args, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_out_not_empty_needs_overwrite(tiny_models, tmp_path):
    m = tiny_models
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    r = _cli("--expert", m["e1"], "--method", "linear", "--out", tmp_path / "out")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = _cli("--expert", m["e1"], "--method", "linear", "--out", tmp_path / "out", "--overwrite", "--quiet")
    assert r.returncode == 0 and not (tmp_path / "out" / "x").exists()


# -- conventions (#16 §3): version, verbosity, mergekit's positional form, --expert A B, --weight --------------
def _digest(folder: Path) -> dict:
    return {n: t for n, t in load_file(str(folder / "model.safetensors")).items()}


def test_version_and_the_program_name_users_typed():
    from ota_trainer import __version__

    r = _cli("--version")
    assert r.returncode == 0 and f"ota_trainer {__version__}" in r.stdout and "merge_from_hub.py" in r.stdout
    exe = Path(sys.executable).with_name("ota-merge")  # the console script pip installed (make venv: -e .)
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: ota-merge"), r.stdout[:200]


def test_mergekits_positional_form_expert_lists_and_weights_equal_the_long_forms(tiny_models, tmp_path):
    m = tiny_models
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {m['e1']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {m['e2']}\n    parameters: {{weight: 3.0}}\n"
    )
    assert _cli(recipe, tmp_path / "positional", "-q").returncode == 0
    assert _cli("--recipe", recipe, "--out", tmp_path / "long", "-q").returncode == 0
    r = _cli("--expert", m["e1"], m["e2"], "--weight", 1, 3, "--method", "linear", "--out", tmp_path / "flags", "-q")
    assert r.returncode == 0, r.stderr
    want = _digest(tmp_path / "long")
    for name in ("positional", "flags"):
        got = _digest(tmp_path / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    unweighted = _digest(tmp_path / "flags")  # the weights did something
    assert _cli("--expert", m["e1"], m["e2"], "--method", "linear", "--out", tmp_path / "plain", "-q").returncode == 0
    plain = _digest(tmp_path / "plain")
    assert any(not torch.equal(plain[k], unweighted[k]) for k in plain)


@pytest.mark.parametrize(
    "args, message",
    [
        (["only_one.yaml"], "give RECIPE OUT"),
        (["a.yaml", "out", "--out", "other"], "not both"),
        (["--expert", "x", "y", "--weight", "1", "--method", "linear", "--out", "o"], "1 weight(s) for 2 expert(s)"),
        (["--expert", "x", "--method", "linear"], "no output folder"),
    ],
)
def test_conventions_refuse_ambiguous_command_lines(args, message, tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_logging_configures_our_loggers_only_and_quiet_silences_download_bars(monkeypatch):
    import argparse
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    from ota_trainer.cli.common import add_common_flags, configure_logging

    p = argparse.ArgumentParser(prog="x")
    add_common_flags(p)
    root_before = list(logging.getLogger().handlers)
    ours = logging.getLogger("ota_trainer")
    saved = (list(ours.handlers), ours.level, ours.propagate)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    try:
        assert configure_logging(p.parse_args(["-v"])) == logging.DEBUG
        assert configure_logging(p.parse_args(["--log-level", "error"])) == logging.ERROR
        assert configure_logging(p.parse_args([])) == logging.INFO
        assert logging.getLogger().handlers == root_before  # the root logger is left alone...
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)  # ...so the Hub client's requests stay quiet
        assert configure_logging(p.parse_args(["-q"])) == logging.WARNING and are_progress_bars_disabled()
        with pytest.raises(SystemExit):
            p.parse_args(["-q", "-v"])
    finally:
        ours.handlers[:], ours.level, ours.propagate = saved
        enable_progress_bars()
    # before huggingface_hub is imported (a local merge never imports it): the bars are off once it is
    code = (
        "import argparse, sys\n"
        "from ota_trainer.cli.common import add_common_flags, configure_logging\n"
        "p = argparse.ArgumentParser(prog='x'); add_common_flags(p); configure_logging(p.parse_args(['-q']))\n"
        "assert 'huggingface_hub' not in sys.modules\n"
        "from huggingface_hub.utils import are_progress_bars_disabled\n"
        "assert are_progress_bars_disabled()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _dry(capsys, *args):
    from ota_trainer.cli.merge import main

    code = main(["--dry-run", "-q", *map(str, args)])
    got = capsys.readouterr()
    return code, got.out, got.err


def test_dry_run_runs_every_check_on_local_folders(tiny_models, bf16_models, tmp_path, capsys):
    """--dry-run runs the merge's checks (configs and headers only) and exits 2 on what the merge
    would refuse: another architecture, an adapter folder without full weights, moments of another model."""
    import shutil

    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = tiny_models
    code, out, _ = _dry(capsys, "--base", m["base"], "--expert", m["e1"], m["e2"], "--out", tmp_path / "o")
    assert code == 0 and "checks passed" in out and "moments" in out
    assert "(cached)" not in out and "(local folder)" in out  # local files are not "cached"
    assert not (tmp_path / "o").exists()

    qwen = tmp_path / "qwen"
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(qwen)
    code, _, err = _dry(
        capsys, "--base", m["base"], "--expert", m["e1"], qwen, "--method", "ties", "--out", tmp_path / "o"
    )
    assert code == 2 and "Qwen2" in err

    lora = tmp_path / "lora"  # what PEFT's save_pretrained writes: an adapter, no full weights
    lora.mkdir()
    (lora / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": str(m["base"])})
    )
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
        str(lora / "adapter_model.safetensors"),
    )
    code, _, err = _dry(capsys, "--base", m["base"], "--expert", m["e1"], lora, "--out", tmp_path / "o")
    assert code == 2 and "lora" in err

    other = tmp_path / "other_moments"  # e1's weights with the moments of a model of another width
    shutil.copytree(m["e1"], other)
    shutil.copyfile(bf16_models["e1"] / "ota" / "moments.safetensors", other / "ota" / "moments.safetensors")
    code, _, err = _dry(capsys, "--base", m["base"], "--expert", other, m["e2"], "--out", tmp_path / "o")
    assert code == 2 and "other_moments" in err and "moments" in err


def test_without_pytorch_a_method_that_needs_it_says_install_torch(tiny_models, tmp_path):
    """In an environment without PyTorch, ota runs on the native kernels and linear (no native
    implementation) fails with one clear line instead of a ModuleNotFoundError."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
    )
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(SCRIPT.parents[1])]))
    m = tiny_models

    def run(method, out, *extra):
        return subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--base",
                m["base"],
                "--expert",
                m["e1"],
                m["e2"],
                "--method",
                method,
                "--out",
                tmp_path / out,
                "-q",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    r = run("ota", "ota")  # the default, the paper's OTA: the native kernels
    if "native kernels are unavailable" in r.stderr:
        pytest.skip("no C compiler: the native kernels are unavailable")
    assert r.returncode == 0, r.stderr
    r = run("linear", "linear")
    assert r.returncode == 2 and "needs PyTorch" in r.stderr and "pip install torch" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "linear").exists()
