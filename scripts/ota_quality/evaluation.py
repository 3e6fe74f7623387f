"""Evaluation for the quality benchmark: lm_eval tasks, the forgetting set and KL, cached.

Every result is cached in ``<out>/evals.json`` under the model's label, keyed by the weight
files' sha256 and the task list, so a re-run evaluates only what changed.

Evaluations run in ``workers`` processes at once, each with one PyTorch thread
(:meth:`Evaluator.submit`, :meth:`Evaluator.drain`). On two cores, two single-threaded
evaluations finish ~8% sooner than the same two one after the other with two threads each (the
same scores: each token's arithmetic is the same on one thread as on two), and the work between
evaluations (a merge, its sha256, loading the model, building the tasks: ~3 s a merge, partly
waiting on the disk) overlaps the other process's generation instead of leaving a core idle.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
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


def _worker_init() -> None:
    """A worker process: one PyTorch thread (the workers share the cores between them)."""
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)


def _run(folder: str, tasks: list[str], include_path: str, batch_size: int) -> dict:
    """One lm_eval run (in a worker, or in this process): per task its accuracy, per-prompt scores
    and first responses."""
    result = lm_evaluate(folder, tasks, include_path=include_path, batch_size=batch_size)
    return {t: {"acc": r["acc"], "scores": r["scores"], "responses": r["responses"][:5]} for t, r in result.items()}


class Evaluator:
    """Cached evaluations (module doc); ``workers`` > 1: that many evaluations at once, in
    processes of one PyTorch thread each."""

    def __init__(self, out: Path, base: Path, *, batch_size: int = 32, cached_only: bool = False, workers: int = 1):
        self.out, self.base, self.batch_size, self.cached_only = out, base, batch_size, cached_only
        self.tasks = out / "tasks"
        self.cache_file = out / "evals.json"
        self.cache = json.loads(self.cache_file.read_text()) if self.cache_file.is_file() else {}
        self._reference: BaseReference | None = None
        self.general: list[dict] = []
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[Future, tuple] = {}

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

    def cached(self, label: str, folder: Path, tasks: list[str], *, kl: bool = True, general: bool = True) -> bool:
        """Whether :meth:`evaluate` has this evaluation cached (a pruned merge needs it)."""
        hit = self.cache.get(label)
        return bool(hit) and hit["key"] == self._key(folder, tasks, kl, general)

    def evaluate(
        self, label: str, folder: Path, tasks: list[str], *, kl: bool = True, general: bool = True
    ) -> dict | None:
        """``{task: {"acc", "scores"}, ..., "kl": float}`` for the model at ``folder`` (None: not
        cached, with ``cached_only``), once every evaluation submitted before it has finished."""
        got = []
        self.submit(label, folder, tasks, got.append, kl=kl, general=general)
        self.drain()
        return got[0]

    def submit(
        self,
        label: str,
        folder: Path,
        tasks: list[str],
        done: Callable[[dict | None], None],
        *,
        kl: bool = True,
        general: bool = True,
    ) -> None:
        """Evaluate as :meth:`evaluate` does, and hand the result to ``done`` (in this thread): at
        once when cached (or not to be evaluated, with ``cached_only``), else from :meth:`drain`
        once a worker has evaluated it. ``folder`` must stay as it is until then."""
        key = self._key(folder, tasks, kl, general)
        hit = self.cache.get(label)
        if hit and hit["key"] == key:
            return done(hit["result"])
        if self.cached_only:
            return done(None)
        job = (str(folder), list(key["tasks"]), str(self.tasks), self.batch_size)
        if self.workers <= 1:
            return self._finish(label, folder, key, kl, _run(*job), done)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
            )
        self._pending[self._pool.submit(_run, *job)] = (label, folder, key, kl, done)

    def drain(self, limit: int = 0) -> None:
        """Finish evaluations until at most ``limit`` are still running or queued."""
        while len(self._pending) > limit:
            finished, _ = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in finished:
                label, folder, key, kl, done = self._pending.pop(future)
                self._finish(label, folder, key, kl, future.result(), done)

    def _finish(self, label: str, folder: Path, key: dict, kl: bool, result: dict, done) -> None:
        if kl:
            result["kl"] = self.reference().kl(folder)
        self.cache[label] = {"key": key, "result": result}
        self.save()
        done(result)

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
