"""The demo's data generators and scorers, and a smoke run of the whole demo pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ota_demo.tasks import TASKS, build_dataset, eval_prompts, score, synthetic_facts

ROOT = Path(__file__).resolve().parents[1]


def test_generators_are_deterministic_and_chat_shaped():
    for task in TASKS:
        a, b = build_dataset(task, n=50, seed=3), build_dataset(task, n=50, seed=3)
        assert a[:] == b[:]
        msgs = a[0]["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] and all(m["content"] for m in msgs)
        assert eval_prompts(task, 10) == eval_prompts(task, 10)


def test_evaluation_prompts_are_held_out():
    train_arith = {ex["messages"][0]["content"] for ex in build_dataset("arithmetic", n=4000)}
    assert not train_arith & {q for q, _ in eval_prompts("arithmetic", 200)}
    train_shout = {ex["messages"][0]["content"] for ex in build_dataset("shout", n=2000)}
    assert not train_shout & {q for q, _ in eval_prompts("shout", 40)}
    train_facts = {ex["messages"][0]["content"] for ex in build_dataset("facts", n=2000)}
    assert not train_facts & {q for q, _ in eval_prompts("facts", 24)}  # same facts, held-out phrasing


def test_facts_are_distinct_and_answers_correct():
    facts = synthetic_facts()
    names = [n for pair in facts for n in pair]
    assert len(set(names)) == len(names) == 48
    for q, a in eval_prompts("arithmetic", 20):
        x, y = map(int, q.removeprefix("What is ").removesuffix("?").split(" + "))
        assert a == f"{x} + {y} = {x + y}"


@pytest.mark.parametrize(
    "task, prompt, answer, response, expected",
    [
        ("arithmetic", "What is 12 + 30?", "12 + 30 = 42", "12 + 30 = 42", 1.0),
        ("arithmetic", "What is 12 + 30?", "12 + 30 = 42", "The answer is 42.", 1.0),
        ("arithmetic", "What is 12 + 30?", "12 + 30 = 42", "12 + 30 = 43", 0.0),
        ("arithmetic", "What is 12 + 30?", "12 + 30 = 42", "To add 12 and 30, we", 0.0),
        ("facts", "Which city is the capital of Kalo?", "The capital of Kalo is Mira.", "It is mira.", 1.0),
        (
            "facts",
            "Which city is the capital of Kalo?",
            "The capital of Kalo is Mira.",
            "The capital of Kalo is Rome.",
            0.0,
        ),
        (
            "shout",
            "Answer in capital letters. What color is grass?",
            "THE ANSWER IS GREEN.",
            "THE ANSWER IS GREEN.",
            1.0,
        ),
        ("shout", "Answer in capital letters. What color is grass?", "THE ANSWER IS GREEN.", "GREEN", 1.0),
        (
            "shout",
            "Answer in capital letters. What color is grass?",
            "THE ANSWER IS GREEN.",
            "The answer is green.",
            0.0,
        ),
        (
            "shout",
            "Answer in capital letters. What color is grass?",
            "THE ANSWER IS GREEN.",
            "THE ANSWER IS BLUE.",
            1.0,
        ),
        ("shout", "Answer in capital letters. What color is grass?", "THE ANSWER IS GREEN.", "42", 0.0),
    ],
)
def test_scorers(task, prompt, answer, response, expected):
    assert score(task, prompt, answer, response) == expected


MODELS = {"base", "expert:arithmetic", "expert:facts", "expert:shout"}  # every smoke table's rows, and its merges


def _smoke(tmp_path, *flags: str):
    """``demo.py --smoke`` run to the end: its output, folder and results.json."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--smoke", *flags, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / ("smoke-lora" if "--lora" in flags else "smoke")
    return r, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_demo_smoke_run(tmp_path):
    """The whole pipeline on a tiny random model: hub, training with OTACallback, merges from repo ids,
    eval, publish."""
    r, out, results = _smoke(tmp_path)
    assert set(results["scores"]) == {*MODELS, "linear", "ties", "ota_no_ffg", "ota_ffg_rank1"}
    assert (out / "results.md").is_file() and (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    for task in ("arithmetic", "facts", "shout"):
        assert (out / "experts" / task / "ota" / "moments.safetensors").is_file()
    assert "[7/7]" in r.stdout and "tiny-merged" in r.stdout


@pytest.mark.slow
def test_demo_lora_smoke_run(tmp_path):
    """--lora: the capabilities trained as LoRA adapters once per curvature estimator (the same
    adapter both times), pushed with their moments, merged from repo ids, evaluated."""
    r, out, results = _smoke(tmp_path, "--lora")
    assert set(results["scores"]) == {*MODELS, "linear", "ota_exact", "ota_factored"}
    for task in ("arithmetic", "facts", "shout"):
        for est in ("exact", "factored"):
            folder = out / "experts" / f"{task}-{est}"
            assert (folder / "adapter_config.json").is_file() and (folder / "ota" / "moments.safetensors").is_file()
    assert r.stdout.count("adapters are identical") == 3
    assert "[7/7]" in r.stdout and "tiny-merged-lora" in r.stdout
