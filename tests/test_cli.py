"""The merge CLI, run as users run it: a subprocess of scripts/merge_from_hub.py."""

from __future__ import annotations

import json
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
