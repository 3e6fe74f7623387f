"""The benchmark scripts run end to end on tiny inputs (their figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_capture_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "capture.json"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_capture.py"),
            "--models",
            "tiny",
            "--steps",
            "1",
            "--seq",
            "8",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| tiny |" in r.stdout and "rank-one moments" in r.stdout
    (row,) = json.loads(out.read_text())
    for c in ("rank1", "full"):
        assert row[c]["capture_s"] > 0 and row[c]["bytes"] > 0
    # full moments hold one fp32 value per parameter: about the fp32 weights' size; rank-one far less
    assert 0.9 < row["full"]["vs_fp32_weights"] < 1.2
    assert row["rank1"]["bytes"] < row["full"]["bytes"] / 5
    assert row["histogram"]["s"] > 0 and "FFG histogram at the end of training" in r.stdout


def test_bench_capture_lora_reports_step_cost_and_agreement(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_capture.py"), "--lora", "--models", "tiny", "--steps", "2"]
    r = subprocess.run(
        [*cmd, "--seq", "8", "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| tiny |" in r.stdout and "exact capture" in r.stdout and "factored capture" in r.stdout
    (row,) = json.loads(out.read_text())
    assert row["off"]["step_s"] > 0 and row["exact"]["bytes"] > 0
    a = row["agreement"]
    assert -1 <= a["corr"] <= 1 and 0 <= a["jaccard"] <= 1


def test_bench_train_times_every_trainer_setting_on_a_tiny_base(tmp_path):
    from ota_trainer.testing.tiny import make_tiny_base, make_tiny_tokenizer

    base = make_tiny_base(tmp_path / "base", seed=0, layers=2, vocab=128)
    make_tiny_tokenizer(base)
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--base", str(base), "--steps", "3"]
    r = subprocess.run(
        [*cmd, "--warmup", "1", "--repeat", "1", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| fused | system |" in r.stdout and "| logits | retain |" in r.stdout, r.stdout
    got = json.loads(out.read_text())
    combos = [(row["lm_head"], row["memory"]) for row in got["rows"]]
    assert combos == [("fused", "system"), ("fused", "retain"), ("logits", "system"), ("logits", "retain")]
    assert all(row["steps"] == 2 and row["median_step_s"] > 0 and row["minflt_per_step"] > 0 for row in got["rows"])
    assert got["loss_max_rel_diff"] < 1e-3  # the same loss either way
    assert got["memory_losses_identical"] and "memory retain vs system: identical" in r.stdout


def test_bench_merge_times_every_contender_on_a_tiny_model(tmp_path):
    out = tmp_path / "merge.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_merge.py"), "--params", "4e6", "--hidden", "128"]
    cmd += ["--intermediate", "256", "--vocab", "1000", "--depth-multiplier", "1", "--no-mergekit", "--repeat", "1"]
    cmd += ["--cache", "warm", "--settle", "0.2", "--work", str(tmp_path / "work"), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "then 0.2 s idle: --settle" in r.stdout, r.stdout
    got = json.loads(out.read_text())
    assert got["settle_s"] == 0.2 and isinstance(got["free_page_reporting"], bool)
    contenders = {run["contender"]: run for run in got["runs"]}
    assert set(contenders) == {
        "copy limit (weights)",
        "copy limit (weights+moments)",
        "copy on every core (weights+moments)",
        "ours: ota",
        "ours: ota (shipped histograms)",
        "ours: ota (re-merge)",
        "ours: ties",
    }
    assert all(run["error"] is None and run["wall_s"] > 0 for run in got["runs"]), got["runs"]
    assert got["ratios"]["ours: ota"][got["runs"][0]["model"]]["vs_parallel_copy"] > 0
    assert "| (info) wall vs a copy on every core |" in r.stdout
