"""Evaluate a model folder on the demo's held-out prompts: batched greedy generation + scorers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .tasks import TASKS, eval_prompts, score

__all__ = ["TaskResult", "evaluate_model", "generate"]


@dataclass
class TaskResult:
    task: str
    score: float
    n: int
    samples: list[tuple[str, str, float]] = field(default_factory=list)  # (prompt, response, score)


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy chat completions for ``prompts`` (left-padded batches)."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in chunk
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        out += [tokenizer.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True) for row in ids]
    return out


def evaluate_model(
    folder: str | os.PathLike,
    tasks: list[str] | None = None,
    *,
    n: int = 48,
    tokenizer_folder: str | os.PathLike | None = None,
) -> dict[str, TaskResult]:
    """Score a model folder on each task's ``n`` held-out prompts (fraction solved, 0..1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or folder)
    results = {}
    for task in tasks or list(TASKS):
        pairs = eval_prompts(task, n)
        responses = generate(model, tokenizer, [q for q, _ in pairs], max_new_tokens=TASKS[task].max_new_tokens)
        scores = [score(task, q, a, r) for (q, a), r in zip(pairs, responses)]
        results[task] = TaskResult(
            task, sum(scores) / len(scores), len(scores), [(q, r, s) for (q, _), r, s in zip(pairs, responses, scores)]
        )
    return results
