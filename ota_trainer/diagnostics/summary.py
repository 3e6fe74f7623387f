"""``summary.md``: the Markdown rendering of a diagnostics dict (:func:`render_summary`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .measures import KINDS, layer_order
from .reading import expert_labels, findings, layer_name, num, pct


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def render_summary(diag: dict, figures: Sequence[str] = ()) -> str:
    """``summary.md``: Markdown tables of a diagnostics dict and a short reading of them."""
    labels = expert_labels(diag)
    experts = diag["experts"]
    parts = [
        "# Expert diagnostics",
        "",
        f"Base `{diag['base']}`; {len(experts)} expert(s); FFG and magnitude pruning at density {diag['density']:g} "
        f"(one global threshold per expert); top-{pct(diag['topk'])} curvature sets per tensor. "
        f"ota_trainer {diag['library_version']}.",
        "",
        "## Reading",
        "",
        " ".join(diag.get("findings") or findings(diag)),
        "",
        "## Experts",
        "",
        _table(
            [
                "expert",
                "model",
                "moments",
                "FFG density",
                "FFG log2(theta)",
                "magnitude density",
                "tensors without moments",
            ],
            [
                [
                    labels[i],
                    f"`{e['model']}`",
                    e["moments"] or "none",
                    pct(e["ffg"]["density"]) if e["ffg"] else "n/a",
                    num(e["ffg"]["threshold_log2"], 2) if e["ffg"] else "n/a",
                    pct(e["magnitude"]["density"]),
                    e["tensors_without_moments"],
                ]
                for i, e in enumerate(experts)
            ],
        ),
        "",
        "## Kept fraction per role",
        "",
        "Share of each role's entries kept (FFG / magnitude).",
        "",
        _table(
            ["role"] + labels,
            [
                [role]
                + [
                    f"{pct((e['ffg'] or {}).get('by_role', {}).get(role, {}).get('fraction'))} / "
                    f"{pct(e['magnitude']['by_role'].get(role, {}).get('fraction'))}"
                    for e in experts
                ]
                for role in diag["roles"]
            ],
        ),
        "",
        "## Kept fraction per layer (FFG)",
        "",
    ]
    layer_keys = sorted({rec["layer"] for e in experts for rec in e["magnitude"]["by_layer"]}, key=layer_order)

    def _layer_fraction(e: dict, kind: str, layer: int | None) -> float | None:
        if not e[kind]:
            return None
        return next((r["fraction"] for r in e[kind]["by_layer"] if r["layer"] == layer), None)

    parts += [
        _table(
            ["layer"] + labels,
            [[layer_name(layer)] + [pct(_layer_fraction(e, "ffg", layer)) for e in experts] for layer in layer_keys],
        ),
        "",
        "## Row and column sparsity per role",
        "",
        "Share of rows (output units) and columns (input features) with every entry pruned, FFG / magnitude.",
        "",
    ]
    rows = []
    for i, e in enumerate(experts):
        for role in diag["roles"]:
            mag = e["magnitude"]["lines"].get(role)
            if mag is None:
                continue
            ffg = (e["ffg"] or {}).get("lines", {}).get(role, {})
            rows.append(
                [
                    labels[i],
                    role,
                    f"{pct(ffg.get('rows_pruned_fraction'))} / {pct(mag['rows_pruned_fraction'])}",
                    f"{pct(ffg.get('cols_pruned_fraction'))} / {pct(mag['cols_pruned_fraction'])}",
                ]
            )
    parts += [_table(["expert", "role", "rows fully pruned", "columns fully pruned"], rows), ""]
    if diag["pairs"]:
        parts += [
            "## Curvature overlap between experts",
            "",
            f"Jaccard of the top-{pct(diag['topk'])} entries of v (per tensor, pooled), with the value for independent "
            "sets; cosine of the rank-one factors (row sums, column sums; mean over tensors).",
            "",
            _table(
                ["pair", "Jaccard", "independent", "cos rows", "cos cols"],
                [
                    [f"{labels[p['a']]} / {labels[p['b']]}"]
                    + (
                        [num(p["curvature"]["overall"][k]) for k in ("jaccard", "chance", "cos_row", "cos_col")]
                        if p["curvature"]
                        else ["n/a"] * 4
                    )
                    for p in diag["pairs"]
                ],
            ),
            "",
        ]
        with_curv = [p for p in diag["pairs"] if p["curvature"]]
        if with_curv:
            parts += [
                "Top-curvature Jaccard per layer:",
                "",
                _table(
                    ["layer"] + [f"{labels[p['a']]} / {labels[p['b']]}" for p in with_curv],
                    [
                        [layer_name(layer)]
                        + [
                            num(next((r["jaccard"] for r in p["curvature"]["by_layer"] if r["layer"] == layer), None))
                            for p in with_curv
                        ]
                        for layer in layer_keys
                    ],
                ),
                "",
            ]
        parts += [
            "## Mask overlap between experts",
            "",
            "Entries kept by both / kept by either (Jaccard), with the value for independent masks of the same "
            "per-tensor densities.",
            "",
            _table(
                ["pair", "FFG", "FFG independent", "magnitude", "magnitude independent"],
                [
                    [f"{labels[p['a']]} / {labels[p['b']]}"]
                    + [
                        pct(p["mask_overlap"][k]["overall"][f]) if p["mask_overlap"][k] else "n/a"
                        for k in KINDS
                        for f in ("jaccard", "chance")
                    ]
                    for p in diag["pairs"]
                ],
            ),
            "",
        ]
    r1 = [(i, e) for i, e in enumerate(experts) if e.get("rank1_quality")]
    if r1:
        parts += [
            "## Rank-one quality (experts with full moments)",
            "",
            "Relative error ||v_rank1 - v||_F / ||v||_F (mean over matrices of the role) and Jaccard of the FFG masks "
            "from full v and from its rank-one reconstruction.",
            "",
            _table(
                ["expert", "role", "matrices", "rel. error (mean)", "rel. error (pooled)", "mask Jaccard"],
                [
                    [
                        labels[i],
                        role,
                        rec["tensors"],
                        num(rec["rel_error_mean"]),
                        num(rec["rel_error_pooled"]),
                        num(rec["mask_jaccard"], 4),
                    ]
                    for i, e in r1
                    for role, rec in list(e["rank1_quality"]["by_role"].items())
                    + [("all", e["rank1_quality"]["overall"])]
                ],
            ),
            "",
        ]
    if figures:
        parts += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + [""]
    return "\n".join(parts)
