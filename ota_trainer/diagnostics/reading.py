"""Reading the numbers: :func:`findings` (the sentences stored in ``diagnostics.json`` and shown
at the top of ``summary.md``) and the formatting that ``summary.md`` and the figures share.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from .measures import KINDS


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def mean(xs: Iterable[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _role_means(diag: dict, kind: str) -> dict[str, float]:
    """Kept fraction per role averaged over the experts that have ``kind`` masks."""
    out = {}
    for role in diag["roles"]:
        m = mean(e[kind]["by_role"].get(role, {}).get("fraction") for e in diag["experts"] if e[kind])
        if m is not None:
            out[role] = m
    return out


def _pair_mean(diag: dict, get: Callable[[dict], float | None]) -> float | None:
    return mean(get(p) for p in diag["pairs"])


def findings(diag: dict) -> list[str]:
    """Two to four sentences reading the key numbers of a diagnostics dict."""
    out = []
    ffg, mag = _role_means(diag, "ffg"), _role_means(diag, "magnitude")
    if ffg:
        ranked = sorted(ffg.items(), key=lambda kv: kv[1])
        low = " and ".join(f"{r} ({pct(x)})" for r, x in ranked[:2])
        high = " and ".join(f"{r} ({pct(x)})" for r, x in ranked[::-1][:2])
        layer_means = defaultdict(list)
        for e in diag["experts"]:
            if e["ffg"]:
                for rec in e["ffg"]["by_layer"]:
                    if rec["layer"] is not None and rec["fraction"] is not None:
                        layer_means[rec["layer"]].append(rec["fraction"])
        layer_text = ""
        if len(layer_means) > 1:
            lm = {k: sum(v) / len(v) for k, v in layer_means.items()}
            lo, hi = min(lm, key=lm.get), max(lm, key=lm.get)
            layer_text = (
                f"; by layer it keeps least in layer {lo} ({pct(lm[lo])}) and most in layer {hi} ({pct(lm[hi])})"
            )
        out.append(
            f"At density {diag['density']:g} with a global threshold, FFG keeps the smallest share of {low} entries "
            f"and the largest of {high} (mean over experts){layer_text}, "
            "while magnitude pruning at the same density keeps between "
            f"{pct(min(mag.values()))} and {pct(max(mag.values()))} in every role."
        )
    elif mag:
        out.append(
            f"No expert has second moments, so only magnitude pruning was inspected: it keeps between "
            f"{pct(min(mag.values()))} and {pct(max(mag.values()))} per role at density {diag['density']:g}."
        )
    if diag["pairs"]:
        jac = _pair_mean(diag, lambda p: p["curvature"]["overall"]["jaccard"] if p["curvature"] else None)
        chance = _pair_mean(diag, lambda p: p["curvature"]["overall"]["chance"] if p["curvature"] else None)
        cos = _pair_mean(
            diag,
            lambda p: (
                mean([p["curvature"]["overall"]["cos_row"], p["curvature"]["overall"]["cos_col"]])
                if p["curvature"]
                else None
            ),
        )
        if jac is not None:
            out.append(
                f"The top-{pct(diag['topk'])} curvature entries of two experts overlap with a mean Jaccard of "
                f"{num(jac)} (independent sets: {num(chance)}), and their rank-one factors (row and column sums "
                f"of v) have a mean cosine of {num(cos)}."
            )
        mj = {
            k: _pair_mean(
                diag, lambda p, k=k: p["mask_overlap"][k]["overall"]["jaccard"] if p["mask_overlap"][k] else None
            )
            for k in KINDS
        }
        mc = _pair_mean(
            diag, lambda p: p["mask_overlap"]["ffg"]["overall"]["chance"] if p["mask_overlap"]["ffg"] else None
        )
        if mj["ffg"] is not None:
            out.append(
                f"Entries kept by both experts' FFG masks make up {pct(mj['ffg'])} of those kept by either "
                f"(independent masks: {pct(mc)}; magnitude masks: {pct(mj['magnitude'])})."
            )
    r1 = [e for e in diag["experts"] if e.get("rank1_quality")]
    if r1:
        err = mean(e["rank1_quality"]["overall"]["rel_error_mean"] for e in r1 if e["rank1_quality"]["overall"])
        agree = mean(e["rank1_quality"]["overall"]["mask_jaccard"] for e in r1 if e["rank1_quality"]["overall"])
        out.append(
            f"Rank-one compression of the full moments has a mean relative error of {num(err)} per matrix, and the "
            f"FFG masks it gives agree with the full-moment masks at Jaccard {num(agree)}."
        )
    return out


# -- labels shared by summary.md and the figures ------------------------------------------------------
def _short(label: str) -> str:
    p = Path(label)
    return p.name or label


def expert_labels(diag: dict) -> list[str]:
    """Short, unique expert labels for tables and figures."""
    short = [_short(m) for m in diag["models"]]
    if len(set(short)) < len(short):
        short = [f"e{i}:{s}" for i, s in enumerate(short)]
    return short


def layer_name(layer: int | None) -> str:
    return "non-layer" if layer is None else str(layer)
