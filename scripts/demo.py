#!/usr/bin/env python
"""`make demo`: the merger end to end on tiny models built here (no downloads).

    python scripts/demo.py [--quick] [--out demo_out]

NOTE: until the SmolLM2-135M demo lands, this demo builds tiny random Llama models (a base
and three "experts" with synthetic second moments), merges them with every method through
the real CLI, checks that each merged folder loads with transformers, and prints a table.
It shows the pipeline, not merge quality: the experts are random perturbations.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [
    ("ota (FFG density 0.4)", ["--method", "ota", "--density", "0.4"]),
    ("ota, no FFG", ["--method", "ota", "--no-graft"]),
    ("ota, magnitude pruning", ["--method", "ota", "--density", "0.4", "--score", "magnitude"]),
    ("fisher", ["--method", "fisher"]),
    ("ties", ["--method", "ties", "--density", "0.4"]),
    ("dare", ["--method", "dare", "--drop-rate", "0.5"]),
    ("task_arithmetic", ["--method", "task_arithmetic", "--lambda", "0.5"]),
    ("linear", ["--method", "linear"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "demo_out"))
    ap.add_argument("--quick", action="store_true", help="two layers instead of four")
    args = ap.parse_args()
    print("NOTE: tiny-model stand-in demo (random tiny Llama experts); the SmolLM2 capability demo is not built yet.\n")

    import torch
    from transformers import AutoModelForCausalLM

    from ota_trainer.testing.tiny import make_tiny_base, make_tiny_expert

    out = Path(args.out)
    models = out / "models"
    layers = 2 if args.quick else 4
    base = models / f"base-L{layers}"
    if not base.is_dir():
        print(f"[1/3] building a tiny base ({layers} layers) and three experts with rank-one moments in {models}")
        make_tiny_base(base, seed=0, layers=layers, hidden=128, vocab=512)
        for i in range(3):
            make_tiny_expert(base, models / f"expert{i}-L{layers}", seed=i + 1, moments="rank1")
    else:
        print(f"[1/3] reusing tiny models in {models}")
    experts = [models / f"expert{i}-L{layers}" for i in range(3)]

    print("[2/3] merging with every method through scripts/merge_from_hub.py")
    rows = []
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    for label, flags in RUNS:
        slug = "".join(c if c.isalnum() else "-" for c in label).strip("-").replace("--", "-")
        dest = out / "merged" / slug
        cmd = [sys.executable, str(ROOT / "scripts" / "merge_from_hub.py"), "--base", str(base), "--quiet", "--overwrite", "--out", str(dest)]
        for e in experts:
            cmd += ["--expert", str(e)]
        t = time.perf_counter()
        r = subprocess.run(cmd + flags, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        seconds = time.perf_counter() - t
        report = json.loads((dest / "ota_merge_report.json").read_text())
        dens = [e["density"] for e in report["experts"] if e["density_target"] is not None]
        model = AutoModelForCausalLM.from_pretrained(dest)
        finite = bool(torch.isfinite(model(prompt).logits).all())
        rows.append((label, seconds, dens, finite))

    print("[3/3] results (each merged folder reloaded with AutoModelForCausalLM.from_pretrained)\n")
    print("| method | wall s | FFG density kept per expert | finite logits |")
    print("| --- | --- | --- | --- |")
    for label, seconds, dens, finite in rows:
        d = ", ".join(f"{x:.3f}" for x in dens) if dens else "-"
        print(f"| {label} | {seconds:.1f} | {d} | {finite} |")
    print(f"\nmerged folders: {out / 'merged'}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
