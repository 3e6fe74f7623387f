"""PNG figures of a diagnostics dict (matplotlib, imported lazily: only :func:`plot_diagnostics`
needs it, through the ``plots`` extra)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from .measures import KINDS, ROLES, layer_order
from .reading import expert_labels, layer_name, mean, num, pct


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the diagnostics figures need matplotlib: pip install 'ota_trainer[plots]' "
            "(or skip them: write_diagnostics(..., plots=False), --no-plots)"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_role_matrix(diag: dict, block: dict) -> tuple[list[str], list[str], list[list[float]]]:
    """(row labels, column roles, values) of a kept-fraction block; NaN where a cell has no tensor."""
    rows = sorted({r["layer"] for r in block["by_layer_role"]}, key=layer_order)
    roles = [r for r in ROLES if any(c["role"] == r for c in block["by_layer_role"])]
    values = [[math.nan] * len(roles) for _ in rows]
    for c in block["by_layer_role"]:
        if c["fraction"] is not None:
            values[rows.index(c["layer"])][roles.index(c["role"])] = c["fraction"]
    return [layer_name(r) for r in rows], roles, values


def _annotate(ax, values, fmt="{:.2f}", threshold=0.5, max_cells=400) -> None:
    n = sum(len(r) for r in values)
    if n > max_cells:
        return
    size = 8 if n <= 100 else 6
    for y, row in enumerate(values):
        for x, val in enumerate(row):
            if val is not None and not math.isnan(val):
                ax.text(
                    x,
                    y,
                    fmt.format(val),
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="black" if val > threshold else "white",
                )


def _plot_kept(plt, diag: dict, i: int, label: str, path: Path) -> None:
    e = diag["experts"][i]
    panels = [(k, e[k]) for k in KINDS if e[k]]
    rows, _, _ = _layer_role_matrix(diag, panels[0][1])
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(5.5 * len(panels) + 1.2, max(3.5, 0.32 * len(rows) + 2.0)),
        squeeze=False,
        constrained_layout=True,
    )
    titles = {"ffg": "FFG: saliency v·d², global threshold", "magnitude": "magnitude pruning: d², global threshold"}
    im = None
    for ax, (kind, block) in zip(axes[0], panels):
        rows, roles, values = _layer_role_matrix(diag, block)
        cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
        im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(len(roles)), roles)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("role (parameter type)")
        ax.set_ylabel("layer index")
        ax.set_title(f"{titles[kind]}\nkept {pct(block['density'])} overall")
        _annotate(ax, values)
    fig.colorbar(im, ax=axes[0].tolist(), label="kept fraction (share of entries kept)")
    fig.suptitle(f"{label}: kept fraction per layer × role at density {diag['density']:g}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_lines(plt, diag: dict, i: int, label: str, path: Path) -> bool:
    e = diag["experts"][i]
    roles = [r for r in ROLES if r in e["magnitude"]["lines"]]
    if not roles:
        return False
    ncols = min(4, len(roles))
    nrows = math.ceil(len(roles) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows + 0.8), squeeze=False, constrained_layout=True
    )
    bins = diag["hist_bins"]
    centers = [(b + 0.5) / bins for b in range(bins)]
    styles = [
        ("ffg", "row", "C0", "-", "FFG rows"),
        ("ffg", "col", "C1", "-", "FFG columns"),
        ("magnitude", "row", "0.45", "--", "magnitude rows"),
        ("magnitude", "col", "0.65", ":", "magnitude columns"),
    ]
    handles = {}
    for ax, role in zip(axes.flat, roles):
        pruned = []
        for kind, line, color, ls, name in styles:
            acc = (e[kind] or {}).get("lines", {}).get(role) if e[kind] else None
            if acc is None:
                continue
            total = acc[line + "s"]
            share = [100.0 * c / total if total else 0.0 for c in acc[line + "_hist"]]
            (h,) = ax.plot(
                centers, share, color=color, linestyle=ls, marker="o" if kind == "ffg" else None, markersize=3
            )
            handles[name] = h
            if kind == "ffg":
                pruned.append(f"{line}s {pct(acc[line + 's_pruned_fraction'])}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("kept fraction of the row / column")
        ax.set_ylabel("% of rows / columns")
        ax.set_title(f"{role}" + (f"\nfully pruned (FFG): {', '.join(pruned)}" if pruned else ""), fontsize=9)
        ax.axvline(diag["density"], color="red", linewidth=0.8, alpha=0.6)
    for ax in axes.flat[len(roles) :]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(
        f"{label}: per-row and per-column kept fraction by role (red line: target density {diag['density']:g})"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pair_matrix(diag: dict, get: Callable[[dict], float | None]) -> list[list[float]]:
    t = len(diag["models"])
    mat = [[1.0 if a == b else math.nan for b in range(t)] for a in range(t)]
    for p in diag["pairs"]:
        x = get(p)
        if x is not None:
            mat[p["a"]][p["b"]] = mat[p["b"]][p["a"]] = x
    return mat


def _matrix_panel(plt, fig, ax, diag, mat, title, cbar_label, labels, vmin=0.0, vmax=1.0) -> None:
    cmap = plt.get_cmap("magma").with_extremes(bad="#dddddd")
    im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(title, fontsize=10)
    _annotate(ax, mat, fmt="{:.3f}", threshold=(vmin + vmax) / 2)
    fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.85)


def _per_layer_panel(ax, diag, labels, get_block, ylabel, title) -> None:
    for k, p in enumerate(diag["pairs"]):
        block = get_block(p)
        if not block:
            continue
        recs = [r for r in block["by_layer"] if r["layer"] is not None and r["jaccard"] is not None]
        if not recs:
            continue
        (h,) = ax.plot(
            [r["layer"] for r in recs],
            [r["jaccard"] for r in recs],
            marker="o",
            markersize=3,
            label=f"{labels[p['a']]} / {labels[p['b']]}",
            color=f"C{k % 10}",
        )
        ax.plot([r["layer"] for r in recs], [r["chance"] for r in recs], linestyle=":", color=h.get_color(), alpha=0.7)
    ax.set_xlabel("layer index")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, title="pair (dotted: independent)", title_fontsize=7)


def _plot_curvature(plt, diag: dict, labels: list[str], path: Path) -> bool:
    if not any(p["curvature"] for p in diag["pairs"]):
        return False
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), constrained_layout=True)
    top = pct(diag["topk"])
    jac = _pair_matrix(diag, lambda p: p["curvature"]["overall"]["jaccard"] if p["curvature"] else None)
    cos = _pair_matrix(
        diag,
        lambda p: (
            mean([p["curvature"]["overall"]["cos_row"], p["curvature"]["overall"]["cos_col"]])
            if p["curvature"]
            else None
        ),
    )
    _matrix_panel(
        plt,
        fig,
        axes[0],
        diag,
        jac,
        f"Jaccard of top-{top} v entries (whole model)",
        "Jaccard index (0 = disjoint, 1 = same set)",
        labels,
    )
    _matrix_panel(
        plt,
        fig,
        axes[1],
        diag,
        cos,
        "cosine of rank-one factors\n(mean of row-sum and column-sum cosines)",
        "cosine similarity",
        labels,
    )
    _per_layer_panel(
        axes[2],
        diag,
        labels,
        lambda p: p["curvature"],
        f"Jaccard of top-{top} v entries",
        "top-curvature Jaccard per layer",
    )
    fig.suptitle(f"Curvature overlap between experts (second moments v, top {top} per tensor)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_mask_overlap(plt, diag: dict, labels: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), constrained_layout=True)
    for ax, kind, name in ((axes[0], "ffg", "FFG"), (axes[1], "magnitude", "magnitude pruning")):
        mat = _pair_matrix(
            diag, lambda p, k=kind: p["mask_overlap"][k]["overall"]["jaccard"] if p["mask_overlap"][k] else None
        )
        chance = mean(p["mask_overlap"][kind]["overall"]["chance"] for p in diag["pairs"] if p["mask_overlap"][kind])
        _matrix_panel(
            plt,
            fig,
            ax,
            diag,
            mat,
            f"{name} masks: kept by both / kept by either\n(independent masks: {num(chance)})",
            "Jaccard index of keep masks",
            labels,
        )
    _per_layer_panel(
        axes[2],
        diag,
        labels,
        lambda p: p["mask_overlap"]["ffg"],
        "Jaccard of FFG keep masks",
        "FFG mask overlap per layer",
    )
    fig.suptitle(f"Mask overlap between experts at density {diag['density']:g}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_rank1(plt, diag: dict, labels: list[str], path: Path) -> bool:
    r1 = [(i, e) for i, e in enumerate(diag["experts"]) if e.get("rank1_quality")]
    if not r1:
        return False
    roles = [r for r in ROLES if any(r in e["rank1_quality"]["by_role"] for _, e in r1)]
    fig, axes = plt.subplots(
        2, 1, figsize=(max(7.0, 0.8 * len(roles) * max(1, len(r1) / 2) + 2.5), 7.5), constrained_layout=True
    )
    width = 0.8 / len(r1)
    panels = (
        (
            "rel_error_mean",
            "relative error\n||v_rank1 − v||_F / ||v||_F",
            "rank-one reconstruction error per role (mean over matrices; 1-D tensors are stored whole)",
        ),
        (
            "mask_jaccard",
            "Jaccard of FFG masks\n(full v vs rank-one v)",
            f"FFG mask agreement at density {diag['density']:g} (n/a: neither mask keeps an entry)",
        ),
    )
    for ax, (key, ylabel, title) in zip(axes, panels):
        top = 0.0
        for k, (i, e) in enumerate(r1):
            by_role = e["rank1_quality"]["by_role"]
            xs = [j + (k - (len(r1) - 1) / 2) * width for j in range(len(roles))]
            ys = [by_role.get(r, {}).get(key) for r in roles]
            ax.bar(xs, [math.nan if y is None else y for y in ys], width, label=labels[i], color=f"C{k % 10}")
            top = max([top] + [y for y in ys if y is not None])
            for x, y in zip(xs, ys):
                if y is None:  # x in data units, y in axes fraction: stays put whatever the y range
                    ax.text(
                        x,
                        0.02,
                        "n/a",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="0.4",
                        transform=ax.get_xaxis_transform(),
                    )
        ax.set_ylim(
            0, max(0.05, 1.1 * top) if key == "rel_error_mean" else 1.02
        )  # near-zero errors stay visibly near zero
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(roles)), roles)
        ax.set_xlabel("role (parameter type)")
        ax.legend(fontsize=8, title="expert", title_fontsize=8)
    fig.suptitle("Rank-one (AdaFactor-style) compression of full second moments")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_diagnostics(diag: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write the PNG figures of a diagnostics dict into ``out_dir`` (matplotlib, Agg backend).

    Files: ``kept_fraction_e{i}.png`` (heatmap layer x role, FFG beside magnitude),
    ``row_col_hist_e{i}.png`` (per-row/column kept fraction per role) for each expert;
    with two or more experts ``curvature_overlap.png`` and ``mask_overlap.png`` (pairwise
    matrices and per-layer curves); ``rank1_quality.png`` when an expert has full moments.

    Returns:
        The written paths.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'ota_trainer[plots]'``).
    """
    plt = _require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = expert_labels(diag)
    written = []
    for i in range(len(diag["experts"])):
        p = out / f"kept_fraction_e{i}.png"
        _plot_kept(plt, diag, i, labels[i], p)
        written.append(p)
        p = out / f"row_col_hist_e{i}.png"
        if _plot_lines(plt, diag, i, labels[i], p):
            written.append(p)
    if diag["pairs"]:
        p = out / "curvature_overlap.png"
        if _plot_curvature(plt, diag, labels, p):
            written.append(p)
        p = out / "mask_overlap.png"
        _plot_mask_overlap(plt, diag, labels, p)
        written.append(p)
    p = out / "rank1_quality.png"
    if _plot_rank1(plt, diag, labels, p):
        written.append(p)
    return written
