#!/usr/bin/env python
"""Evaluate a model folder with lm-evaluation-harness: our capability tasks or standard ones.

    python scripts/evaluate.py --model merged/                       # our five capabilities, test split
    python scripts/evaluate.py --model merged/ --tasks ota_facts_test ota_code_dev
    python scripts/evaluate.py --model merged/ --tasks hellaswag arc_easy --no-chat-template  # standard tasks

Our tasks (``ota_<capability>_<split>``, capabilities: arithmetic facts shout code extract;
splits: dev test) are written as local lm_eval tasks (YAML + JSONL) into ``--tasks-dir`` first;
any other task name is lm_eval's own (its data must be downloadable or cached on your machine).
Greedy generation through lm_eval's HF backend; prints a table, ``--json`` writes the
per-prompt scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from ota_quality.capabilities import CAPABILITIES, examples  # noqa: E402
from ota_quality.lm_tasks import evaluate, task_name, write_tasks  # noqa: E402

SPLITS = ("dev", "test")


def ours(names: list[str]) -> list[tuple[str, str]]:
    """(capability, split) of each of our task names; an error for an ota_* name we do not have."""
    known = {task_name(c, s): (c, s) for c in CAPABILITIES for s in SPLITS}
    bad = [n for n in names if n.startswith("ota_") and n not in known]
    if bad:
        raise SystemExit(f"unknown task(s) {bad}; ours are: {' '.join(sorted(known))}")
    return [known[n] for n in names if n in known]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (or Hub id lm_eval can load)")
    ap.add_argument("--tasks", nargs="+", default=[task_name(c, "test") for c in CAPABILITIES])
    ap.add_argument("--tasks-dir", default=str(ROOT / "quality_out" / "tasks"), help="where our task files go")
    ap.add_argument("--n", type=int, default=150, help="prompts per task of ours")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, help="at most this many prompts per task (a quick look)")
    ap.add_argument("--no-chat-template", action="store_true", help="plain prompts (base models, standard tasks)")
    ap.add_argument(
        "--no-shared-prefix",
        action="store_true",
        help="lm_eval's own HF model (default: each batch's shared prompt head computed once, same tokens)",
    )
    ap.add_argument("--json", help="write per-prompt scores here")
    args = ap.parse_args(argv)
    mine = ours(args.tasks)
    if mine:
        write_tasks(args.tasks_dir, {(c, s): examples(c, s, args.n) for c, s in mine})
    results = evaluate(
        args.model,
        args.tasks,
        include_path=args.tasks_dir if mine else None,
        batch_size=args.batch_size,
        limit=args.limit,
        chat_template=not args.no_chat_template,
        shared_prefix=not args.no_shared_prefix,
    )
    width = max(len(t) for t in results)
    for task, r in results.items():
        print(f"{task:<{width}}  {r['acc']:.3f}  (n={len(r['scores'])})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
