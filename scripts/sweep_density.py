#!/usr/bin/env python
"""FFG vs magnitude pruning at decreasing density, for one expert on its own capability.

    python scripts/sweep_density.py --base BASE --expert EXPERT --task facts --out sweep/
    python scripts/sweep_density.py --base demo/SmolLM2-135M-Instruct --expert demo/expert-facts --task facts \\
        --densities 1,0.5,0.2,0.1,0.05 --shares 0.9,0.99 --out sweep/

Grafting one expert is an `ota` merge with that expert alone (w0 + M * d). For each density
the expert is grafted with the Fisher saliency v*d^2 (FFG) and with |d| (magnitude pruning),
evaluated on its capability's held-out prompts, and the saliency-share rules (keep the top
edits holding a share of the expert's total saliency; no density to tune) are added for
comparison. Writes sweep.md, sweep.json and sweep.png to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--task", required=True, help="the expert's capability (ota_demo.tasks)")
    ap.add_argument("--densities", default="1,0.5,0.2,0.1,0.05")
    ap.add_argument("--shares", default="0.9,0.99", help="saliency-share rules to compare (empty: none)")
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    from ota_demo.evaluate import evaluate_model

    from ota_trainer import merge
    from ota_trainer.errors import OTAError
    from ota_trainer.hub import HubResolver

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    densities = [float(x) for x in args.densities.split(",") if x]
    shares = [float(x) for x in args.shares.split(",") if x]
    resolver = HubResolver(need_moments=True)
    tokenizer = resolver(args.base)
    rows = []
    try:
        runs = [("fisher", "density", d) for d in densities] + [("magnitude", "density", d) for d in densities]
        runs += [("fisher", "saliency_share", s) for s in shares]
        for score, rule, value in runs:
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                recipe = {
                    "method": "ota",
                    "base_model": args.base,
                    "models": [args.expert],
                    "parameters": {"score": score, rule: value},
                }
                report = merge(recipe, Path(tmp) / "m", quiet=True, resolver=resolver)
                res = evaluate_model(Path(tmp) / "m", [args.task], n=args.n_eval, tokenizer_folder=tokenizer)[args.task]
            rows.append(
                {
                    "score": score,
                    "rule": rule,
                    "value": value,
                    "density": report.experts[0].density,
                    "task_score": res.score,
                }
            )
            print(
                f"{score:9s} {rule}={value:<5} kept {rows[-1]['density']:.4f}  {args.task} {res.score:.3f}", flush=True
            )
    except OTAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "sweep.json").write_text(json.dumps({"task": args.task, "expert": args.expert, "rows": rows}, indent=1))
    lines = [
        f"FFG vs magnitude pruning: {args.expert} on {args.task} ({args.n_eval} held-out prompts)",
        "",
        "| density | FFG (fisher) | magnitude |",
        "| --- | --- | --- |",
    ]
    for d in densities:
        f = next(r for r in rows if r["score"] == "fisher" and r["rule"] == "density" and r["value"] == d)
        m = next(r for r in rows if r["score"] == "magnitude" and r["value"] == d)
        lines.append(f"| {d} | {f['task_score']:.3f} | {m['task_score']:.3f} |")
    for r in rows:
        if r["rule"] == "saliency_share":
            lines.append(f"| share {r['value']} (kept {r['density']:.3f}) | {r['task_score']:.3f} | - |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, densities, args, out / "sweep.png")
    return 0


def _plot(rows, densities, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for score, style in (("fisher", "o-"), ("magnitude", "s--")):
        pts = [(r["density"], r["task_score"]) for r in rows if r["score"] == score and r["rule"] == "density"]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            style,
            label="FFG (v·d²)" if score == "fisher" else "magnitude (|d|)",
        )
    for r in rows:
        if r["rule"] == "saliency_share":
            ax.plot(r["density"], r["task_score"], "k*", markersize=12)
            ax.annotate(
                f"share {r['value']}", (r["density"], r["task_score"]), textcoords="offset points", xytext=(5, 5)
            )
    ax.set_xscale("log")
    ax.set_xlabel("fraction of edits kept (density, log scale)")
    ax.set_ylabel(f"{args.task}: held-out prompts solved (fraction)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Grafting one expert: FFG vs magnitude pruning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
