"""The quality benchmark's report: results.json, results.md and plots, with bootstrap intervals."""

from __future__ import annotations

import json
from pathlib import Path

from . import choice, stats
from .lm_tasks import expert_scores, split_scores, task_name

__all__ = ["brief", "compact", "dev_candidates", "summarise", "write"]

GENERAL = "ota_general"
DEV_CHOICE = "ota_dev_choice"  # the five-way entry of the ota setting chosen on the dev split


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _versus(runs: dict, name: str, caps: list[str], experts: dict | None, split: str = "test") -> dict:
    """``name`` minus every other run on the same ``split`` prompts (paired bootstrap; normalised
    by ``experts``, or raw accuracy when None)."""
    if name not in runs:
        return {}
    a = split_scores(runs[name], caps, split)
    out = {}
    for method, res in runs.items():
        if method != name:
            d = stats.paired(a, split_scores(res, caps, split), experts)
            out[method] = {**d.as_dict(), "ota_better": d.lo > 0}
    return out


def dev_candidates(seed_result: dict, candidates: list[str], caps: list[str]) -> dict:
    """Each candidate for ``ota``'s default (the first: the paper's recipe) on the dev split: its
    five-way score, its mean pair score, J, and J minus the paper recipe's (paired), as intervals."""
    out = {}
    for study in candidates:
        j = choice.objective(seed_result, study, caps)
        if j is None:
            continue
        out[study] = {
            "five": choice.objective(seed_result, study, caps, pair_weight=0.0).as_dict(),
            "pairs": choice.objective(seed_result, study, caps, pair_weight=1.0).as_dict(),
            "J": j.as_dict(),
            "J_minus_paper": choice.objective(seed_result, study, caps, minus=candidates[0]).as_dict()
            if study != candidates[0]
            else None,
        }
    return out


def _scale(scale: dict, caps: list[str], ex_dev: dict) -> dict:
    """The scale study (dev split), each entry normalised by the recipe experts' dev scores; an
    entry of one capability also as its raw accuracy; ``mixed/X`` also minus ``reference/X`` (paired)."""
    out = {}
    for key, res in scale.items():
        sc = split_scores(res, caps, "dev")
        ex = {c: ex_dev[c] for c in sc}
        entry = {"normalised": stats.normalised(sc, ex).as_dict()}
        if len(sc) == 1:
            entry.update(capability=next(iter(sc)), accuracy=stats.mean_ci(next(iter(sc.values()))).as_dict())
        ref = scale.get("reference/" + key.removeprefix("mixed/")) if key.startswith("mixed/") else None
        if ref is not None:
            entry["minus_reference"] = stats.paired(sc, split_scores(ref, caps, "dev"), ex).as_dict()
        out[key] = entry
    for c in sorted({e["capability"] for e in out.values() if "capability" in e}):  # the recipe experts beside them
        out[f"expert/{c}"] = {"capability": c, "accuracy": stats.mean_ci(ex_dev[c]).as_dict()}
    return out


def _scale_versus(scale: dict, caps: list[str], ex_dev: dict) -> dict:
    """Within each merge of the scale study (``mixed``, ``lr_pair``), ``ota`` minus every other
    method on the same dev prompts (paired): normalised for the five-way merge, raw accuracy for a
    merge scored on one capability (the lr pair)."""
    out: dict = {}
    for study in ("mixed", "lr_pair"):
        runs = {k.split("/", 1)[1]: res for k, res in sorted(scale.items()) if k.startswith(study + "/")}
        scored = split_scores(runs["ota"], caps, "dev") if "ota" in runs else {}
        ex = None if len(scored) == 1 else {c: ex_dev[c] for c in scored}
        out.update({f"{study}: ota − {m}": d for m, d in _versus(runs, "ota", caps, ex, "dev").items()})
    return out


def brief(result: dict, caps: list[str], split: str = "test") -> str:
    parts = [f"{c} {result[task_name(c, split)]['acc']:.2f}" for c in caps if task_name(c, split) in result]
    if GENERAL in result:
        parts.append(f"general {result[GENERAL]['acc']:.2f}")
    if "kl" in result:
        parts.append(f"KL {result['kl']:.3f}")
    return ", ".join(parts)


def _fmt(i: stats.Interval, digits: int = 2) -> str:
    return f"{i.est:.{digits}f} [{i.lo:.{digits}f}, {i.hi:.{digits}f}]"


def summarise(results: dict, caps: list[str]) -> dict:
    """Intervals for every model of every seed: per capability, normalised, forgetting, and the
    paired differences of ``ota`` against every other method (5-expert merge, test split)."""
    summary: dict = {"seeds": {}}
    for seed, r in results["seeds"].items():
        s: dict = {"five": {}, "ota_vs": {}, "sweeps": {}, "pairs": {}, "pair_calls": {}}
        ex_test, ex_dev = expert_scores(r, caps, "test"), expert_scores(r, caps, "dev")
        if ex_test is None:
            continue
        for method, res in r["five"].items():
            sc = split_scores(res, caps, "test")
            s["five"][method] = {
                "per_capability": {c: stats.mean_ci(v).as_dict() for c, v in sc.items()},
                "normalised": stats.normalised(sc, ex_test).as_dict(),
                "normalised_dev": stats.normalised(split_scores(res, caps, "dev"), ex_dev).as_dict()
                if ex_dev and all(task_name(c, "dev") in res for c in caps)
                else None,
                "general": stats.mean_ci(res[GENERAL]["scores"]).as_dict() if GENERAL in res else None,
                "kl": res.get("kl"),
            }
        s["ota_vs"] = _versus(r["five"], "ota", caps, ex_test)
        s["dev_choice_vs"] = _versus(r["five"], DEV_CHOICE, caps, ex_test)
        for label, res in r["sweeps"].items() if ex_dev else ():
            s["sweeps"][label] = stats.normalised(split_scores(res, caps, "dev"), ex_dev).as_dict()
        s["dev_choice"] = dev_candidates(r, results.get("dev_candidates", []), caps)
        s["scale"] = _scale(r.get("scale", {}), caps, ex_dev) if ex_dev else {}
        s["scale_versus"] = _scale_versus(r.get("scale", {}), caps, ex_dev) if ex_dev else {}
        for label, res in r["pairs"].items():
            pair, method = label.split("/")
            pc = pair.split("+")
            s["pairs"].setdefault(pair, {})[method] = stats.normalised(
                split_scores(res, pc, "test"), {c: ex_test[c] for c in pc}
            ).as_dict()
        pair_calls = {}
        for label, res in r["pairs"].items():
            pair, method = label.split("/")
            if method == "ota":
                continue
            pc = pair.split("+")
            ota = r["pairs"].get(f"{pair}/ota")
            if ota is None:
                continue
            d = stats.paired(split_scores(ota, pc, "test"), split_scores(res, pc, "test"), {c: ex_test[c] for c in pc})
            pair_calls.setdefault(method, {"win": 0, "tie": 0, "loss": 0})
            pair_calls[method]["win" if d.lo > 0 else "loss" if d.hi < 0 else "tie"] += 1
        s["pair_calls"] = pair_calls
        s["experts"] = {c: stats.mean_ci(ex_test[c]).as_dict() for c in caps}
        s["base"] = {c: results["base"][task_name(c, "test")]["acc"] for c in caps}
        summary["seeds"][seed] = s
    return summary


def _table(s: dict, caps: list[str]) -> list[str]:
    head = "| model | " + " | ".join(caps) + " | normalised (test) | general kept | KL(base‖merge) |"
    lines = [head, "|" + "---|" * (len(caps) + 4)]
    lines.append("| base | " + " | ".join(f"{s['base'][c]:.2f}" for c in caps) + " | | 1.00 (by construction) | 0 |")
    lines.append(
        "| each expert, own capability | "
        + " | ".join(_fmt(stats.Interval(**s["experts"][c])) for c in caps)
        + " | 1 | | |"
    )
    order = sorted(s["five"], key=lambda m: -s["five"][m]["normalised"]["est"])
    for m in order:
        f = s["five"][m]
        cells = [_fmt(stats.Interval(**f["per_capability"][c])) for c in caps]
        gen = _fmt(stats.Interval(**f["general"])) if f["general"] else ""
        kl = f"{f['kl']:.3f}" if f["kl"] is not None else ""
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | **{_fmt(stats.Interval(**f['normalised']))}** | {gen} | {kl} |"
        )
    return lines


def _cell(d: dict | None, digits: int = 2) -> str:
    """An interval as stored in the summary (``Interval.as_dict``), formatted; empty when missing."""
    return _fmt(stats.Interval(d["est"], d["lo"], d["hi"]), digits) if d else ""


def _scale_md(scale: dict, study: dict, caps: list[str]) -> list[str]:
    """The scale study's tables (``study``: what bench_quality.py trained and merged for it)."""

    variants = study.get("variants", {})
    made = ", ".join(
        f"{name} is {v['capability']} with " + ", ".join(f"{k} {x:g}" for k, x in v["overrides"].items())
        for name, v in variants.items()
    )
    md = [f"Scale study (dev split): {made}; normalised by the recipe experts' dev scores.", ""]
    md += [
        f"| method | reference: the {len(caps)} recipe experts | mixed: "
        + " and ".join(variants)
        + " in their place | mixed − reference (paired) |",
        "|---|---|---|---|",
    ]
    for m in sorted({k.split("/", 1)[1] for k in scale if k.startswith(("reference/", "mixed/"))}):
        ref, mix = scale.get(f"reference/{m}", {}), scale.get(f"mixed/{m}", {})
        md.append(
            f"| {m} | {_cell(ref.get('normalised'))} | {_cell(mix.get('normalised'))} | "
            f"{_cell(mix.get('minus_reference'), 3)} |"
        )
    md += ["", "| model | capability | accuracy (dev) | normalised (dev) |", "|---|---|---|---|"]
    pair = " + ".join(study.get("lr_pair", []))
    for key, e in sorted(scale.items(), key=lambda kv: (kv[1].get("capability", ""), kv[0])):
        if "capability" in e:
            kind, name = key.split("/", 1)
            who = f"{pair}, {name}" if kind == "lr_pair" else f"expert {name}"
            md.append(f"| {who} | {e['capability']} | {_cell(e['accuracy'])} | {_cell(e.get('normalised'))} |")
    return md


def write(out: Path, results: dict, caps: list[str]) -> dict:
    summary = summarise(results, caps)
    (out / "results.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1))
    md = [f"# Quality benchmark ({results['mode']})", ""]
    md.append(
        f"Forgetting set: {results['general_n']} general questions the base answers correctly. "
        "Intervals: 95% bootstrap over prompts (2000 resamples); normalised = mean over capabilities "
        "of merge score / the expert's own score."
    )
    for seed, s in summary["seeds"].items():
        md += ["", f"## Seed {seed}: all {len(caps)} experts merged, test split", ""]
        md += _table(s, caps)
        for key, who in (("ota_vs", "ota"), ("dev_choice_vs", DEV_CHOICE)):
            if s.get(key):
                md += ["", f"{who} minus each method (normalised, paired bootstrap on the same prompts):", ""]
                md += [f"| method | {who} − method | {who} better (interval > 0) |", "|---|---|---|"]
                for m, d in sorted(s[key].items(), key=lambda kv: kv[1]["est"]):
                    md.append(f"| {m} | {_fmt(stats.Interval(d['est'], d['lo'], d['hi']), 3)} | {d['ota_better']} |")
        if s["sweeps"]:
            md += [
                "",
                "Dev-split studies (normalised on the dev split):",
                "",
                "| setting | normalised (dev) |",
                "|---|---|",
            ]
            for label, d in sorted(s["sweeps"].items()):
                md.append(f"| {label} | {_fmt(stats.Interval(**d))} |")
        if s.get("dev_choice"):
            md += [
                "",
                f"Candidates for ota's default (dev split): J = {1 - choice.PAIR_WEIGHT:g} x five-way + "
                f"{choice.PAIR_WEIGHT:g} x mean of the {len(choice.pairs_of(caps))} pairs (normalised); the first row "
                "is the paper's recipe:",
                "",
                "| candidate | five-way (dev) | mean of pairs (dev) | J | J − paper recipe (paired) |",
                "|---|---|---|---|---|",
            ]
            for study, d in s["dev_choice"].items():
                md.append(
                    f"| {study} | {_cell(d['five'])} | {_cell(d['pairs'])} | {_cell(d['J'])} | "
                    f"{_cell(d['J_minus_paper'], 3)} |"
                )
        if s["scale"]:
            md += ["", *_scale_md(s["scale"], results.get("scale_study", {}), caps)]
        if s["scale_versus"]:
            md += ["", "Scale study, paired on the same dev prompts (the lr pair on its capability's accuracy):", ""]
            md += ["| comparison | difference |", "|---|---|"]
            md += [f"| {k} | {_cell(d, 3)} |" for k, d in s["scale_versus"].items()]
        if s["pair_calls"]:
            md += ["", "Pairs: ota against each method on every pair (paired bootstrap):", ""]
            md += ["| method | ota wins | ties | ota loses |", "|---|---|---|---|"]
            for m, c in s["pair_calls"].items():
                md.append(f"| {m} | {c['win']} | {c['tie']} | {c['loss']} |")
    md += ["", "## All seeds", "", compact(summary)]
    (out / "results.md").write_text("\n".join(md) + "\n")
    plots(out, summary, caps)
    return summary


def plots(out: Path, summary: dict, caps: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for seed, s in summary["seeds"].items():
        # score vs forgetting, every method (test split)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m, f in s["five"].items():
            if not f["general"]:
                continue
            n, g = f["normalised"], f["general"]
            ax.errorbar(
                1 - g["est"],
                n["est"],
                xerr=[[g["hi"] - g["est"]], [g["est"] - g["lo"]]],
                yerr=[[n["est"] - n["lo"]], [n["hi"] - n["est"]]],
                fmt="o",
                capsize=3,
                label=m,
            )
        ax.set_xlabel("forgetting (1 - general questions kept)")
        ax.set_ylabel("normalised score (test)")
        ax.set_title(f"5-expert merge, seed {seed}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"score_vs_forgetting_seed{seed}.png", dpi=110)
        plt.close(fig)
        # per-capability bars with intervals
        methods = sorted(s["five"], key=lambda m: -s["five"][m]["normalised"]["est"])
        fig, ax = plt.subplots(figsize=(max(6, len(methods) * 0.9), 4))
        w = 0.8 / len(caps)
        for k, c in enumerate(caps):
            est = [s["five"][m]["per_capability"][c]["est"] for m in methods]
            lo = [e - s["five"][m]["per_capability"][c]["lo"] for e, m in zip(est, methods)]
            hi = [s["five"][m]["per_capability"][c]["hi"] - e for e, m in zip(est, methods)]
            ax.bar([i + k * w for i in range(len(methods))], est, w, yerr=[lo, hi], capsize=2, label=c)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(methods))], methods, rotation=30, ha="right")
        ax.set_ylabel("score (test)")
        ax.legend(fontsize=7, ncol=len(caps))
        fig.tight_layout()
        fig.savefig(out / f"per_capability_seed{seed}.png", dpi=110)
        plt.close(fig)
        # normalised vs density (dev)
        curves = {"ota (fisher score)": "ota_d", "ota (magnitude score)": "ota_mag_d", "ties": "ties_d"}
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for name, prefix in curves.items():
            pts = sorted(
                (float(label[len(prefix) :]), d)
                for label, d in s["sweeps"].items()
                if label.startswith(prefix) and _is_number(label[len(prefix) :])  # not the combined studies
            )
            if pts:
                drawn = True
                ax.errorbar(
                    [p for p, _ in pts],
                    [d["est"] for _, d in pts],
                    yerr=[[d["est"] - d["lo"] for _, d in pts], [d["hi"] - d["est"] for _, d in pts]],
                    marker="o",
                    capsize=3,
                    label=name,
                )
        dare = sorted(
            (1 - float(label[len("dare_drop") :]), d)
            for label, d in s["sweeps"].items()
            if label.startswith("dare_drop")
        )
        if dare:
            drawn = True
            ax.errorbar(
                [p for p, _ in dare], [d["est"] for _, d in dare], marker="s", capsize=3, label="dare (1 - drop)"
            )
        if drawn:
            ax.set_xscale("log")
            ax.set_xlabel("density (kept fraction)")
            ax.set_ylabel("normalised score (dev)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / f"density_seed{seed}.png", dpi=110)
        plt.close(fig)


def compact(summary: dict) -> str:
    """Seeds side by side, for the README: every method's normalised test score, forgetting and
    KL; ota against each method (paired); the dev studies."""
    seeds = list(summary["seeds"])
    if not seeds:
        return ""
    s0 = summary["seeds"][seeds[0]]

    lines = ["| method | " + " | ".join(f"normalised, seed {s}" for s in seeds)]
    lines[0] += " | " + " | ".join(f"general kept, seed {s}" for s in seeds)
    lines[0] += " | " + " | ".join(f"KL, seed {s}" for s in seeds) + " |"
    lines.append("|---" * (1 + 3 * len(seeds)) + "|")
    for m in sorted(s0["five"], key=lambda m: -s0["five"][m]["normalised"]["est"]):
        rows = [summary["seeds"][s]["five"].get(m) for s in seeds]
        lines.append(
            f"| {m} | "
            + " | ".join(_cell(r["normalised"]) if r else "" for r in rows)
            + " | "
            + " | ".join(_cell(r["general"]) if r and r["general"] else "" for r in rows)
            + " | "
            + " | ".join(f"{r['kl']:.2f}" if r and r["kl"] is not None else "" for r in rows)
            + " |"
        )
    for key, who in (("ota_vs", "ota"), ("dev_choice_vs", DEV_CHOICE)):
        if not s0.get(key):
            continue
        lines += ["", f"| {who} − method (paired) | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
        lines.append("|---" * (1 + len(seeds)) + "|")
        for m in sorted(s0[key]):
            ds = [summary["seeds"][s][key].get(m) for s in seeds]
            lines.append(f"| {m} | " + " | ".join(_cell(d, 3) for d in ds) + " |")
    studies = list(s0.get("dev_choice", {}))
    if studies:
        lines += ["", "| candidate (dev split) | " + " | ".join(f"five-way, seed {s}" for s in seeds)]
        lines[-1] += " | " + " | ".join(f"pairs, seed {s}" for s in seeds)
        lines[-1] += " | " + " | ".join(f"J − paper recipe, seed {s}" for s in seeds) + " |"
        lines.append("|---" * (1 + 3 * len(seeds)) + "|")
        for study in studies:
            ds = [summary["seeds"][s].get("dev_choice", {}).get(study) for s in seeds]
            cells = [_cell(d["five"]) if d else "" for d in ds] + [_cell(d["pairs"]) if d else "" for d in ds]
            cells += [_cell(d["J_minus_paper"], 3) if d else "" for d in ds]
            lines.append(f"| {study} | " + " | ".join(cells) + " |")
    labels = sorted({k for s in seeds for k in summary["seeds"][s]["sweeps"]})
    if labels:
        lines += ["", "| setting (dev split) | " + " | ".join(f"normalised, seed {s}" for s in seeds) + " |"]
        lines.append("|---" * (1 + len(seeds)) + "|")
        for label in labels:
            lines.append(
                f"| {label} | " + " | ".join(_cell(summary["seeds"][s]["sweeps"].get(label)) for s in seeds) + " |"
            )
    return "\n".join(lines)
