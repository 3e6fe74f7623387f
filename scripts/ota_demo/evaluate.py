"""Evaluate a model folder on the demo's held-out prompts through lm-evaluation-harness: each
demo task is written as a local lm_eval task (JSONL + YAML, scored by ``ota_demo.tasks``) and
run with its HF backend (batched greedy generation, the chat template), as the quality
benchmark's tasks are (scripts/ota_quality/lm_tasks.py)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from ota_quality.lm_tasks import evaluate, write_task

from .tasks import TASKS, eval_prompts

__all__ = ["TaskResult", "evaluate_model"]


@dataclass
class TaskResult:
    task: str
    score: float
    n: int
    samples: list[tuple[str, str, float]] = field(default_factory=list)  # (prompt, response, score)


def evaluate_model(
    folder: str | os.PathLike,
    tasks: list[str] | None = None,
    *,
    n: int = 48,
    tokenizer_folder: str | os.PathLike | None = None,
    batch_size: int = 32,
) -> dict[str, TaskResult]:
    """Score a model folder on each task's ``n`` held-out prompts (fraction solved, 0..1)."""
    tasks = tasks or list(TASKS)
    prompts = {t: [{"prompt": q, "answer": a} for q, a in eval_prompts(t, n)] for t in tasks}
    with tempfile.TemporaryDirectory(prefix="ota-demo-tasks-") as tmp:
        names = {
            t: write_task(
                tmp, f"ota_demo_{t}", t, prompts[t], TASKS[t].max_new_tokens, scorer="ota_demo.tasks:score_doc"
            )
            for t in tasks
        }
        res = evaluate(
            folder, list(names.values()), include_path=tmp, batch_size=batch_size, tokenizer=tokenizer_folder
        )
    out = {}
    for t, name in names.items():
        r = res[name]
        samples = [(p["prompt"], resp, s) for p, resp, s in zip(prompts[t], r["responses"], r["scores"])]
        out[t] = TaskResult(t, r["acc"], len(r["scores"]), samples)
    return out
