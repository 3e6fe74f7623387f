"""Evaluation for the quality benchmark: lm_eval tasks, the forgetting set and KL, cached.

Every result is cached in ``<out>/evals.json`` under the model's label, keyed by the weight
files' sha256 and the tasks' files, so a re-run evaluates only what changed, and the same weights
on the same tasks under another label are not evaluated again.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .drift import BaseReference
from .lm_tasks import evaluate as lm_evaluate
from .lm_tasks import write_task

__all__ = ["Evaluator"]

GENERAL = "ota_general"
KL_PROMPTS = 64


PRUNED = "bench_quality_pruned.json"  # a merge whose weights were deleted once evaluated: their sha256


def fingerprint(folder: Path) -> str:
    """sha256 of the folder's weight files (names and bytes): a re-made merge with the same bytes
    keeps its cached evaluation. Remembered per (name, size, mtime) in ``.ota_quality_fp.json``;
    a pruned folder (:func:`prune`) answers with the sha256 its weights had."""
    if is_pruned(folder):
        return json.loads((Path(folder) / PRUNED).read_text())["sha256"]
    files = sorted(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")
    stat = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo = Path(folder) / ".ota_quality_fp.json"
    if memo.is_file():
        saved = json.loads(memo.read_text())
        if saved.get("stat") == stat:
            return saved["sha256"]
    h = hashlib.sha256()
    with ThreadPoolExecutor(1) as reader:  # the next chunk read while this one is hashed
        for p in files:
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                ahead = reader.submit(f.read, 1 << 24)
                while chunk := ahead.result():
                    ahead = reader.submit(f.read, 1 << 24)
                    h.update(chunk)
    memo.write_text(json.dumps({"stat": stat, "sha256": h.hexdigest()}))
    return h.hexdigest()


def is_pruned(folder: Path) -> bool:
    """Whether ``folder``'s weights were deleted by :func:`prune` (and not made again since)."""
    folder = Path(folder)
    return (folder / PRUNED).is_file() and not any(p.suffix == ".safetensors" for p in folder.iterdir())


def prune(folder: Path) -> None:
    """Delete an evaluated merge's weight files, keeping their sha256 (its evaluation's cache key):
    a full run makes ~170 merges of SmolLM2-135M, ~90 GB if all were kept."""
    folder = Path(folder)
    (folder / PRUNED).write_text(json.dumps({"sha256": fingerprint(folder)}))
    for p in folder.iterdir():
        if p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"):
            p.unlink()


class Evaluator:
    def __init__(self, out: Path, base: Path, *, batch_size: int = 32, cached_only: bool = False):
        self.out, self.base, self.batch_size, self.cached_only = out, base, batch_size, cached_only
        self.tasks = out / "tasks"
        self.cache_file = out / "evals.json"
        self.cache = json.loads(self.cache_file.read_text()) if self.cache_file.is_file() else {}
        self._reference: BaseReference | None = None
        self.general: list[dict] = []

    def save(self) -> None:
        tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
        tmp.write_text(json.dumps(self.cache))
        os.replace(tmp, self.cache_file)

    def _task_digest(self, task: str) -> str:
        """sha256 of a task's files (its prompts and its YAML): a changed task is evaluated again."""
        h = hashlib.sha256()
        for suffix in (".jsonl", ".yaml"):
            path = self.tasks / f"{task}{suffix}"
            h.update(path.read_bytes() if path.is_file() else task.encode())
        return h.hexdigest()[:16]

    def forgetting_set(self, candidates: list[dict], max_n: int) -> list[dict]:
        """The candidates the base answers correctly (first ``max_n``, in candidate order), written
        as the ``ota_general`` task."""
        write_task(self.tasks, "ota_general_candidates", "general", candidates, 16)
        res = self.evaluate("base/general_candidates", self.base, ["ota_general_candidates"], kl=False, general=False)
        scores = res["ota_general_candidates"]["scores"] if res else []
        self.general = [c for c, s in zip(candidates, scores) if s == 1.0][:max_n]
        if not self.general:  # a tiny random model answers nothing: keep the pipeline going
            self.general = candidates[:max_n]
        write_task(self.tasks, GENERAL, "general", self.general, 16)
        return self.general

    def reference(self) -> BaseReference:
        if self._reference is None:
            prompts = [g["prompt"] for g in self.general[:KL_PROMPTS]]
            self._reference = BaseReference(self.base, prompts, batch_size=self.batch_size)
        return self._reference

    def _key(self, folder: Path, tasks: list[str], kl: bool, general: bool) -> dict:
        tasks = list(tasks) + ([GENERAL] if general and self.general else [])
        return {
            "fp": fingerprint(folder),
            "tasks": {t: self._task_digest(t) for t in tasks},
            "kl": kl,
            "general": [g["prompt"] for g in self.general[:KL_PROMPTS]] if kl else None,
        }

    def _hit(self, label: str, key: dict) -> dict | None:
        """The cached result of an evaluation: under ``label``, or under another label with the same
        key, the same weights on the same tasks (ota's default and the dev choice it came from are
        one merge: it is evaluated once, and cached under both labels)."""
        hit = self.cache.get(label)
        if hit and hit["key"] == key:
            return hit["result"]
        same = next((entry for entry in self.cache.values() if entry["key"] == key), None)
        if same is None:
            return None
        if not self.cached_only:  # (a report changes nothing on disk)
            self.cache[label] = {"key": key, "result": same["result"]}
            self.save()
        return same["result"]

    def cached(self, label: str, folder: Path, tasks: list[str], *, kl: bool = True, general: bool = True) -> bool:
        """Whether :meth:`evaluate` has this evaluation cached (a pruned merge needs it)."""
        return self._hit(label, self._key(folder, tasks, kl, general)) is not None

    def evaluate(
        self, label: str, folder: Path, tasks: list[str], *, kl: bool = True, general: bool = True
    ) -> dict | None:
        """``{task: {"acc", "scores"}, ..., "kl": float}`` for the model at ``folder`` (None: not
        cached, with ``cached_only``)."""
        key = self._key(folder, tasks, kl, general)
        hit = self._hit(label, key)
        if hit is not None:
            return hit
        if self.cached_only:
            return None
        tasks = list(key["tasks"])
        result = lm_evaluate(folder, tasks, include_path=self.tasks, batch_size=self.batch_size)
        result = {
            t: {"acc": r["acc"], "scores": r["scores"], "responses": r["responses"][:5]} for t, r in result.items()
        }
        if kl:
            result["kl"] = self.reference().kl(folder)
        self.cache[label] = {"key": key, "result": result}
        self.save()
        return result
