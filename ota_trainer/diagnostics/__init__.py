"""Diagnostics: where Fast Fisher Grafting cuts and how experts' curvature overlaps.

The analyses of method.md ("Analyses worth reproducing"), computed by streaming one tensor
name at a time over a base and its experts (never a whole model in memory):

1. **Kept fraction per layer x role**, per expert: FFG (``s = v * d**2``) against magnitude
   pruning (``s = d**2``), both with a GLOBAL threshold at the same density over all of the
   expert's entries, found exactly as the merge engine does (a :class:`SaliencyHistogram`
   pass, then masks from the same bins).
2. **Row and column sparsity** of those masks per role. A tensor is viewed as the matrix
   ``(shape[0], prod(shape[1:]))``; for a ``Linear`` weight a row is an output unit and a
   column an input feature. Reported: the fraction of rows (columns) with every entry
   pruned, and a histogram of the per-row (per-column) kept fraction.
3. **Curvature overlap** per pair of experts, per layer and role:

   * Jaccard ``|A & B| / |A | B|`` of the top-``topk`` entries of ``v_hat``, where the top set
     of a tensor is ``{v >= k-th largest value} & {v > 0}`` with ``k = round(topk * numel)``,
     chosen PER TENSOR (curvature scales differ by orders of magnitude between tensors, so a
     global top-k would only describe the few largest ones). Layer and role values pool the
     intersection and union counts of their tensors.
   * Cosine similarity of the rank-one factors, computed PER TENSOR and SEPARATELY for the
     row sums ``r = v.sum(1)`` (``cos_row``) and the column sums ``c = v.sum(0)``
     (``cos_col``); ``cos_factors`` is the cosine of the concatenation ``[r; c]`` (``r`` and
     ``c`` have the same total, so neither dominates). 1-D tensors (norms) have only
     ``cos_row``, the cosine of ``v`` itself. Layer and role values are unweighted means
     over their tensors. Sums of non-negative numbers make even unrelated experts score well
     above 0 (about 0.6-0.8 for independent log-normal moments): compare pairs with each
     other, and read the Jaccard against its ``chance`` value.
4. **Mask overlap** per pair of experts: entries kept by both / entries kept by either
   (Jaccard of the keep masks), for FFG and for magnitude masks.
5. **Rank-one quality** for experts whose moments file stores full moments (compression
   ``"full"``): ``||v_hat_rank1 - v||_F / ||v||_F`` per 2-D tensor, and the Jaccard of the FFG
   masks computed from full ``v`` and from its rank-one reconstruction, each with its own
   global threshold at the same density.

Every overlap comes with ``chance``: the Jaccard two independent masks with the same per-tensor
kept fractions would have on average (``sum n p_a p_b / sum n (p_a + p_b - p_a p_b)``).

Entry points: :func:`inspect_experts` returns plain JSON-serialisable data;
:func:`write_diagnostics` writes ``diagnostics.json``, ``summary.md`` and PNG figures
(:func:`plot_diagnostics`, which needs the ``plots`` extra: matplotlib). The pure tensor
functions (:func:`parse_name`, :func:`top_fraction_mask`, :func:`overlap_counts`,
:func:`cosine`, :func:`line_kept_fractions`, :func:`rank1_relative_error`) do no I/O.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..io.checkpoint import ModelFolder
from ..moments.compress import matrix_shape, rank1_factors, rank1_reconstruct
from ..errors import ConfigError
from ..moments.format import MomentsReader
from ..backends.torch.ffg import SaliencyHistogram, Threshold, keep_mask, saliency
from ..merger.inputs import check_compatible, check_moments, open_moments
from ..merger.report import local_resolver as _local_resolver

logger = logging.getLogger(__name__)

__all__ = [
    "ROLES",
    "KINDS",
    "HIST_BINS",
    "DIAGNOSTICS_FILE",
    "SUMMARY_FILE",
    "parse_name",
    "top_fraction_mask",
    "overlap_counts",
    "jaccard",
    "cosine",
    "line_kept_fractions",
    "fraction_histogram",
    "rank1_relative_error",
    "inspect_experts",
    "render_summary",
    "plot_diagnostics",
    "write_diagnostics",
]

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "other")
KINDS = ("ffg", "magnitude")  # mask kinds: fisher saliency (FFG) and the magnitude ablation
HIST_BINS = 20  # bins of width 1/20 over [0, 1] for per-row/column kept fractions
DIAGNOSTICS_FILE = "diagnostics.json"
SUMMARY_FILE = "summary.md"
SCHEMA_VERSION = 1

Resolver = Callable[[str], Path]

# module name (the component before .weight/.bias) -> role; Llama, Mistral, Qwen2/3, Mixtral (w1/w2/w3)
_ROLE_BY_MODULE = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "embed_tokens": "embed",
    "lm_head": "lm_head",
}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


# -- pure tensor functions ------------------------------------------------------------------------
def parse_name(name: str) -> tuple[int | None, str]:
    """``(layer index or None, role)`` of a Hugging Face Llama/Mistral/Qwen-style parameter name.

    >>> parse_name("model.layers.3.self_attn.q_proj.weight")
    (3, 'q')
    >>> parse_name("model.embed_tokens.weight")
    (None, 'embed')
    >>> parse_name("model.layers.0.block_sparse_moe.gate.weight")  # MoE router
    (0, 'other')
    """
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    role = _ROLE_BY_MODULE.get(module)
    if role is None:
        role = "norm" if module.endswith("norm") or module.startswith("ln_") else "other"
    return layer, role


@torch.no_grad()
def top_fraction_mask(v: torch.Tensor, fraction: float) -> torch.Tensor:
    """``{v >= k-th largest value of v} & {v > 0}`` with ``k = max(1, round(fraction * numel))``.

    Ties at the k-th value are all kept (the set depends only on ``v``), and zero curvature
    never counts as "top" (a tensor of zeros has an empty top set).
    """
    flat = v.reshape(-1).to(torch.float32)
    n = flat.numel()
    k = min(max(1, round(fraction * n)), n)
    kth = torch.kthvalue(flat, n - k + 1).values  # k-th largest
    return (v >= kth) & (v > 0)


@torch.no_grad()
def overlap_counts(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """``(|a & b|, |a | b|)`` of two bool masks."""
    return int((a & b).sum()), int((a | b).sum())


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """``|a & b| / |a | b|`` of two bool masks; ``None`` when both are empty."""
    both, either = overlap_counts(a, b)
    return both / either if either else None


@torch.no_grad()
def cosine(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """``<x, y> / (||x|| ||y||)`` in float64 (after scaling by the max, so tiny moments do not
    underflow); ``None`` when either vector is zero."""
    x = x.reshape(-1).to(torch.float64)
    y = y.reshape(-1).to(torch.float64)
    sx, sy = x.abs().max(), y.abs().max()
    if sx == 0 or sy == 0:
        return None
    x, y = x / sx, y / sy
    return float((x @ y) / (x.norm() * y.norm()))


@torch.no_grad()
def line_kept_fractions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept fraction of each row and each column of ``mask`` viewed as ``(shape[0], prod(shape[1:]))``.

    Returns:
        ``(rows, cols)``: float32 tensors of shapes ``(m,)`` and ``(n,)``.
    """
    m, n = matrix_shape(mask.shape)
    mat = mask.reshape(m, n).to(torch.float32)  # (m, n)
    return mat.mean(dim=1), mat.mean(dim=0)


@torch.no_grad()
def fraction_histogram(fractions: torch.Tensor, bins: int = HIST_BINS) -> list[int]:
    """Counts of values in ``[0, 1]`` over ``bins`` equal bins (bin ``b`` is ``[b/bins, (b+1)/bins)``,
    the last bin also holds 1.0)."""
    idx = (fractions.to(torch.float32) * bins).floor().clamp_(0, bins - 1).to(torch.int64)
    return [int(x) for x in torch.bincount(idx, minlength=bins)]


@torch.no_grad()
def rank1_relative_error(v: torch.Tensor) -> float | None:
    """``||v_hat - v||_F / ||v||_F`` with ``v_hat = outer(r, c) / r.sum()`` the rank-one
    reconstruction (method.md §2); ``None`` when ``v == 0``. Computed in float64."""
    r, c = rank1_factors(v)
    v1 = rank1_reconstruct(r, c, v.shape)
    return _rank1_error_terms(v, v1)[2]


_CHUNK = 1 << 22  # elements per float64 chunk: bounds temporary memory on embedding-sized tensors


def _rank1_error_terms(v: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float | None]:
    """``(||v1 - v||^2, ||v||^2, relative error)``, accumulated in float64 chunk by chunk
    (squares of Adam moments, ~1e-20, underflow float32)."""
    fv, fv1 = v.reshape(-1), v1.reshape(-1)
    err_sq = norm_sq = 0.0
    for start in range(0, fv.numel(), _CHUNK):
        a = fv[start : start + _CHUNK].to(torch.float64)
        b = fv1[start : start + _CHUNK].to(torch.float64)
        err_sq += float((b - a).square_().sum())
        norm_sq += float(a.square_().sum())
    return err_sq, norm_sq, (math.sqrt(err_sq / norm_sq) if norm_sq > 0 else None)


def _rank1(v: torch.Tensor) -> torch.Tensor:
    """Rank-one reconstruction of a 2+-D moment (what ``compression="rank1"`` would store)."""
    r, c = rank1_factors(v)
    return rank1_reconstruct(r, c, v.shape)


# -- tallies ------------------------------------------------------------------------------------
def _tally() -> defaultdict:
    """cell -> field -> running sum."""
    return defaultdict(lambda: defaultdict(float))


def _rollup(cells: dict, by: str) -> dict:
    """Sum a tally's fields over cells grouped ``by`` ``"layer_role"``, ``"layer"``, ``"role"`` or ``"all"``."""
    out: dict = defaultdict(lambda: defaultdict(float))
    for (layer, role), fields in cells.items():
        key = {"layer_role": (layer, role), "layer": layer, "role": role, "all": None}[by]
        for f, x in fields.items():
            out[key][f] += x
    return out


def _layer_order(layer: int | None) -> tuple[int, int]:
    return (1, 0) if layer is None else (0, layer)


def _cell_order(cell: tuple[int | None, str]) -> tuple:
    layer, role = cell
    return (*_layer_order(layer), ROLES.index(role))


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _kept_record(f: dict) -> dict:
    return {"kept": int(f["kept"]), "total": int(f["total"]), "fraction": _ratio(f["kept"], f["total"])}


def _overlap_record(f: dict) -> dict:
    return {
        "both": int(f["both"]),
        "either": int(f["either"]),
        "jaccard": _ratio(f["both"], f["either"]),
        "chance": _ratio(f["exp_both"], f["exp_either"]),
    }


def _curvature_record(f: dict) -> dict:
    rec = _overlap_record(f)
    for name in ("cos_row", "cos_col", "cos_factors"):
        rec[name] = _ratio(f[name + "_sum"], f[name + "_n"])
    return rec


def _rank1_record(f: dict) -> dict:
    return {
        "tensors": int(f["n"]),
        "rel_error_mean": _ratio(f["rel_sum"], f["n"]),
        "rel_error_pooled": math.sqrt(f["err_sq"] / f["norm_sq"]) if f["norm_sq"] > 0 else None,
        "mask_jaccard": _ratio(f["both"], f["either"]),
    }


def _records(cells: dict, make: Callable[[dict], dict]) -> dict[str, Any]:
    """The by_layer_role / by_layer / by_role / overall views of one tally."""
    lr = _rollup(cells, "layer_role")
    by_layer = _rollup(cells, "layer")
    by_role = _rollup(cells, "role")
    overall = _rollup(cells, "all")
    return {
        "overall": make(overall[None]) if overall else None,
        "by_role": {r: make(by_role[r]) for r in ROLES if r in by_role},
        "by_layer": [{"layer": layer, **make(by_layer[layer])} for layer in sorted(by_layer, key=_layer_order)],
        "by_layer_role": [{"layer": c[0], "role": c[1], **make(lr[c])} for c in sorted(lr, key=_cell_order)],
    }


def _add_overlap(fields: dict, a: torch.Tensor, b: torch.Tensor) -> None:
    """Add the overlap counts of masks a and b, and what independent masks would give, to a tally cell."""
    n = a.numel()
    both, either = overlap_counts(a, b)
    pa, pb = int(a.sum()) / n, int(b.sum()) / n
    fields["both"] += both
    fields["either"] += either
    fields["exp_both"] += n * pa * pb
    fields["exp_either"] += n * (pa + pb - pa * pb)


def _threshold_json(t: Threshold | None) -> float | None:
    return t.log2_value if t is not None and math.isfinite(t.log2_value) else None


# -- the streaming driver ---------------------------------------------------------------------------
class _BatchedHistogram:
    """A :class:`SaliencyHistogram` fed in batches of at least ``_BATCH`` scores.

    Each ``SaliencyHistogram.add`` costs a pass over its 2**21 bins whatever the input size,
    which dominates for small tensors; counts are additive, so concatenating small tensors
    first gives the same histogram (memory stays bounded by one batch).
    """

    _BATCH = 1 << 22

    def __init__(self) -> None:
        self.hist = SaliencyHistogram()
        self._pending: list[torch.Tensor] = []
        self._size = 0

    def add(self, s: torch.Tensor) -> None:
        if s.numel() >= self._BATCH:  # large enough alone: no concatenation copy
            self.flush()
            self.hist.add(s)
            return
        self._pending.append(s.reshape(-1))
        self._size += s.numel()
        if self._size >= self._BATCH:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.hist.add(torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0])
        self._pending, self._size = [], 0

    def threshold_for_density(self, density: float) -> Threshold:
        self.flush()
        return self.hist.threshold_for_density(density)


class _Inspector:
    """Two streaming passes over base + experts + moments (one tensor name at a time)."""

    def __init__(self, base: str, experts: Sequence[str], *, density: float, topk: float,
                 bias_correction: bool, resolver: Resolver, quiet: bool):
        self.density, self.topk, self.quiet = density, topk, quiet
        self.base = ModelFolder(resolver(base), label=base)
        self.experts = [ModelFolder(resolver(e), label=e) for e in experts]
        check_compatible(self.base.layout, [e.layout for e in self.experts])
        self.names = [n for n in self.base.names() if self.base.tensors[n].dtype.is_floating_point]
        self.moments: list[MomentsReader | None] = []
        self.missing: list[int] = []
        for e in self.experts:
            layout = open_moments(e.layout)
            if layout is None:
                logger.warning("%s: no second moments; FFG and curvature diagnostics are skipped for it", e.label)
                self.moments.append(None)
                self.missing.append(0)
                continue
            check_moments(e.layout, layout, [], allow_missing=True)  # names and shapes must match the weights
            m = MomentsReader(layout, bias_correction=bias_correction, model=e.label)
            missing = [n for n in self.names if n not in m]
            if missing:
                logger.warning("%s: no moments for %d tensor(s) (e.g. %s); FFG keeps those whole, as the merge engine does",
                               e.label, len(missing), missing[:3])
            self.moments.append(m)
            self.missing.append(len(missing))
        self.full = [m is not None and m.metadata["compression"] == "full" for m in self.moments]
        t = len(self.experts)
        self.thresholds: dict[str, list[Threshold | None]] = {"ffg": [None] * t, "magnitude": [None] * t, "rank1": [None] * t}
        self.kept = [{k: _tally() for k in KINDS} for _ in range(t)]
        self.lines = [{k: defaultdict(lambda: {"rows": 0, "rows_pruned": 0, "row_hist": [0] * HIST_BINS,
                                               "cols": 0, "cols_pruned": 0, "col_hist": [0] * HIST_BINS})
                       for k in KINDS} for _ in range(t)]
        self.rank1 = [_tally() for _ in range(t)]
        self.rank1_tensors: list[list[dict]] = [[] for _ in range(t)]
        self.pairs = [(a, b) for a in range(t) for b in range(a + 1, t)]
        self.curvature = {p: _tally() for p in self.pairs}
        self.mask_overlap = {p: {k: _tally() for k in KINDS} for p in self.pairs}
        self.tensors: list[dict] = []

    def _v(self, i: int, name: str) -> torch.Tensor | None:
        m = self.moments[i]
        return m[name] if m is not None and name in m else None

    # pass 1: global thresholds -----------------------------------------------------------------
    def find_thresholds(self) -> None:
        t = len(self.experts)
        hists = {
            "ffg": [_BatchedHistogram() if m is not None else None for m in self.moments],
            "magnitude": [_BatchedHistogram() for _ in range(t)],
            "rank1": [_BatchedHistogram() if f else None for f in self.full],
        }
        for name in tqdm(self.names, desc="thresholds", unit="tensor", disable=self.quiet):
            w0 = self.base.get(name).float()
            for i, e in enumerate(self.experts):
                d = torch.sub(e.get(name), w0)
                hists["magnitude"][i].add(saliency(d, None, "magnitude"))
                v = self._v(i, name)
                if v is None:
                    continue  # no evidence to prune: FFG keeps this tensor whole (as in the merge engine)
                hists["ffg"][i].add(saliency(d, v))
                if self.full[i]:
                    hists["rank1"][i].add(saliency(d, _rank1(v) if v.dim() >= 2 else v))
        for kind, hs in hists.items():
            for i, h in enumerate(hs):
                if h is not None:
                    self.thresholds[kind][i] = h.threshold_for_density(self.density)

    # pass 2: masks and overlaps ------------------------------------------------------------------
    def inspect(self) -> None:
        for name in tqdm(self.names, desc="diagnostics", unit="tensor", disable=self.quiet):
            self._inspect_tensor(name)

    def _inspect_tensor(self, name: str) -> None:
        t = len(self.experts)
        w0 = self.base.get(name).float()
        n = w0.numel()
        cell = parse_name(name)
        is_matrix = w0.dim() >= 2
        masks: dict[str, list[torch.Tensor | None]] = {k: [None] * t for k in KINDS}
        # per expert, only bool masks and the (m + n) rank-one factors outlive its iteration: peak
        # memory is the base, one expert's float32 working set, and a few bool masks per expert
        tops: list[torch.Tensor | None] = [None] * t
        factors: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * t
        rank1_err: list[float | None] = [None] * t
        for i, e in enumerate(self.experts):
            d = torch.sub(e.get(name), w0)
            masks["magnitude"][i] = keep_mask(saliency(d, None, "magnitude"), self.thresholds["magnitude"][i])
            v = self._v(i, name)
            if self.moments[i] is not None:
                masks["ffg"][i] = (keep_mask(saliency(d, v), self.thresholds["ffg"][i]) if v is not None
                                   else torch.ones_like(d, dtype=torch.bool))
            if self.full[i] and v is not None:
                v1 = _rank1(v) if is_matrix else v  # 1-D moments are stored whole in either compression
                m1 = keep_mask(saliency(d, v1), self.thresholds["rank1"][i])
                f = self.rank1[i][cell]
                both, either = overlap_counts(masks["ffg"][i], m1)
                f["both"] += both
                f["either"] += either
                if is_matrix:
                    err_sq, norm_sq, rel = _rank1_error_terms(v, v1)
                    rank1_err[i] = rel
                    f["err_sq"] += err_sq
                    f["norm_sq"] += norm_sq
                    if rel is not None:
                        f["rel_sum"] += rel
                        f["n"] += 1
                    self.rank1_tensors[i].append({"name": name, "layer": cell[0], "role": cell[1], "rel_error": rel,
                                                  "mask_jaccard": _ratio(both, either)})
                del v1, m1
            if v is not None:
                tops[i] = top_fraction_mask(v, self.topk)
                factors[i] = rank1_factors(v) if is_matrix else (v, None)
            del d, v
            for kind in KINDS:
                mask = masks[kind][i]
                if mask is None:
                    continue
                f = self.kept[i][kind][cell]
                f["kept"] += int(mask.sum())
                f["total"] += n
                if is_matrix:
                    rows, cols = line_kept_fractions(mask)
                    acc = self.lines[i][kind][cell[1]]
                    acc["rows"] += rows.numel()
                    acc["rows_pruned"] += int((rows == 0).sum())
                    acc["row_hist"] = [a + b for a, b in zip(acc["row_hist"], fraction_histogram(rows))]
                    acc["cols"] += cols.numel()
                    acc["cols_pruned"] += int((cols == 0).sum())
                    acc["col_hist"] = [a + b for a, b in zip(acc["col_hist"], fraction_histogram(cols))]
        for a, b in self.pairs:
            for kind in KINDS:
                if masks[kind][a] is not None and masks[kind][b] is not None:
                    _add_overlap(self.mask_overlap[(a, b)][kind][cell], masks[kind][a], masks[kind][b])
            if tops[a] is None or tops[b] is None:
                continue
            f = self.curvature[(a, b)][cell]
            _add_overlap(f, tops[a], tops[b])
            (ra, ca), (rb, cb) = factors[a], factors[b]
            sims = {"cos_row": cosine(ra, rb)}
            if ca is not None:
                sims["cos_col"] = cosine(ca, cb)
                sims["cos_factors"] = cosine(torch.cat([ra, ca]), torch.cat([rb, cb]))
            for key, s in sims.items():
                if s is not None:
                    f[key + "_sum"] += s
                    f[key + "_n"] += 1
        self.tensors.append({
            "name": name,
            "layer": cell[0],
            "role": cell[1],
            "shape": list(w0.shape),
            "ffg_kept": [float(m.sum()) / n if m is not None else None for m in masks["ffg"]],
            "magnitude_kept": [float(m.sum()) / n for m in masks["magnitude"]],
            "rank1_rel_error": rank1_err,
        })

    # results -------------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        layers = sorted({c[0] for c in map(parse_name, self.names) if c[0] is not None})
        experts = []
        for i, e in enumerate(self.experts):
            entry: dict[str, Any] = {
                "index": i,
                "model": e.label,
                "moments": self.moments[i].metadata["compression"] if self.moments[i] is not None else None,
                "tensors_without_moments": self.missing[i] if self.moments[i] is not None else len(self.names),
            }
            for kind in KINDS:
                if kind == "ffg" and self.moments[i] is None:
                    entry[kind] = None
                    continue
                thr = self.thresholds[kind][i]
                recs = _records(self.kept[i][kind], _kept_record)
                lines = {}
                for role in ROLES:
                    acc = self.lines[i][kind].get(role)
                    if acc is None:
                        continue
                    lines[role] = {
                        **acc,
                        "rows_pruned_fraction": _ratio(acc["rows_pruned"], acc["rows"]),
                        "cols_pruned_fraction": _ratio(acc["cols_pruned"], acc["cols"]),
                    }
                entry[kind] = {
                    "threshold_log2": _threshold_json(thr),
                    "kept": recs["overall"]["kept"] if recs["overall"] else 0,
                    "total": recs["overall"]["total"] if recs["overall"] else 0,
                    "density": recs["overall"]["fraction"] if recs["overall"] else None,
                    **{k: recs[k] for k in ("by_role", "by_layer", "by_layer_role")},
                    "lines": lines,
                }
            if self.full[i]:
                recs = _records(self.rank1[i], _rank1_record)
                entry["rank1_quality"] = {
                    "threshold_log2": _threshold_json(self.thresholds["rank1"][i]),
                    **recs,
                    "by_tensor": self.rank1_tensors[i],
                }
            else:
                entry["rank1_quality"] = None
            experts.append(entry)
        pairs = []
        for a, b in self.pairs:
            pairs.append({
                "a": a,
                "b": b,
                "models": [self.experts[a].label, self.experts[b].label],
                "curvature": _records(self.curvature[(a, b)], _curvature_record) if self.curvature[(a, b)] else None,
                "mask_overlap": {
                    k: (_records(self.mask_overlap[(a, b)][k], _overlap_record) if self.mask_overlap[(a, b)][k] else None)
                    for k in KINDS
                },
            })
        return {
            "schema_version": SCHEMA_VERSION,
            "library_version": __version__,
            "base": self.base.label,
            "models": [e.label for e in self.experts],
            "density": self.density,
            "topk": self.topk,
            "num_layers": len(layers),
            "layers": layers,
            "roles": [r for r in ROLES if any(parse_name(n)[1] == r for n in self.names)],
            "hist_bins": HIST_BINS,
            "experts": experts,
            "pairs": pairs,
            "tensors": self.tensors,
        }


def inspect_experts(
    base: str | os.PathLike,
    experts: Sequence[str | os.PathLike],
    *,
    density: float = 0.4,
    topk: float = 0.1,
    bias_correction: bool = True,
    resolver: Resolver | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Where FFG cuts and how the experts' curvature overlaps, streamed tensor by tensor.

    Two passes over the base, the experts and their moments, holding one tensor name at a
    time: the first builds each expert's global FFG and magnitude thresholds (the merge
    engine's :class:`SaliencyHistogram`), the second builds the masks and every statistic.

    Args:
        base: the base model (folder, or anything ``resolver`` accepts).
        experts: the fine-tuned experts; those without a moments file get magnitude
            diagnostics only.
        density: fraction of each expert's entries kept, by FFG and by magnitude pruning
            (global threshold over the expert, as ``merge(..., density=)``).
        topk: fraction of each tensor's entries counted as "top curvature" for the
            curvature-overlap Jaccard.
        bias_correction: divide ``v`` by ``1 - beta2**step`` (the merge default; a per-expert
            constant, so it changes no mask beyond histogram-bin rounding).
        resolver: turns a model reference into a local folder (default: it is a folder);
            the Hub layer's resolver plugs in here.
        quiet: no progress bars.

    Returns:
        A JSON-serialisable dict: ``models``, ``density``, ``topk``, ``layers``, ``roles``;
        ``experts[i]`` with ``ffg`` and ``magnitude`` (threshold, achieved density, kept
        fraction ``by_role``/``by_layer``/``by_layer_role``, row/column sparsity ``lines``
        per role) and ``rank1_quality`` (full moments only); ``pairs`` with ``curvature``
        and ``mask_overlap`` (``overall``/``by_role``/``by_layer``/``by_layer_role``);
        ``tensors``, one record per tensor. Undefined ratios are ``None``.

    Raises:
        ConfigError: density not in (0, 1], topk not in (0, 1), or no experts.
        FormatError, IncompatibleModelsError, NumericalError: as for :func:`ota_trainer.merge`.

    Example:
        >>> diag = inspect_experts("base", ["math", "code"], density=0.4)
        >>> diag["experts"][0]["ffg"]["by_role"]["q"]["fraction"]
        0.07
    """
    if not experts:
        raise ConfigError("give at least one expert to inspect")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density={density} must be in (0, 1] (the fraction of each expert's edits kept)")
    if not 0.0 < topk < 1.0:
        raise ConfigError(f"topk={topk} must be in (0, 1) (the fraction of each tensor counted as top curvature)")
    inspector = _Inspector(str(base), [str(e) for e in experts], density=density, topk=topk,
                           bias_correction=bias_correction, resolver=resolver or _local_resolver, quiet=quiet)
    inspector.find_thresholds()
    inspector.inspect()
    diag = inspector.result()
    diag["findings"] = findings(diag)
    return diag


# -- reading the numbers ----------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _mean(xs: Iterable[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _role_means(diag: dict, kind: str) -> dict[str, float]:
    """Kept fraction per role averaged over the experts that have ``kind`` masks."""
    out = {}
    for role in diag["roles"]:
        m = _mean(e[kind]["by_role"].get(role, {}).get("fraction") for e in diag["experts"] if e[kind])
        if m is not None:
            out[role] = m
    return out


def _pair_mean(diag: dict, get: Callable[[dict], float | None]) -> float | None:
    return _mean(get(p) for p in diag["pairs"])


def findings(diag: dict) -> list[str]:
    """Two to four sentences reading the key numbers of a diagnostics dict."""
    out = []
    ffg, mag = _role_means(diag, "ffg"), _role_means(diag, "magnitude")
    if ffg:
        ranked = sorted(ffg.items(), key=lambda kv: kv[1])
        low = " and ".join(f"{r} ({_pct(x)})" for r, x in ranked[:2])
        high = " and ".join(f"{r} ({_pct(x)})" for r, x in ranked[::-1][:2])
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
            layer_text = f"; by layer it keeps least in layer {lo} ({_pct(lm[lo])}) and most in layer {hi} ({_pct(lm[hi])})"
        out.append(
            f"At density {diag['density']:g} with a global threshold, FFG keeps the smallest share of {low} entries "
            f"and the largest of {high} (mean over experts){layer_text}, while magnitude pruning at the same density keeps between "
            f"{_pct(min(mag.values()))} and {_pct(max(mag.values()))} in every role."
        )
    elif mag:
        out.append(f"No expert has second moments, so only magnitude pruning was inspected: it keeps between "
                   f"{_pct(min(mag.values()))} and {_pct(max(mag.values()))} per role at density {diag['density']:g}.")
    if diag["pairs"]:
        jac = _pair_mean(diag, lambda p: p["curvature"]["overall"]["jaccard"] if p["curvature"] else None)
        chance = _pair_mean(diag, lambda p: p["curvature"]["overall"]["chance"] if p["curvature"] else None)
        cos = _pair_mean(diag, lambda p: _mean([p["curvature"]["overall"]["cos_row"], p["curvature"]["overall"]["cos_col"]])
                         if p["curvature"] else None)
        if jac is not None:
            out.append(
                f"The top-{_pct(diag['topk'])} curvature entries of two experts overlap with a mean Jaccard of "
                f"{_num(jac)} (independent sets: {_num(chance)}), and their rank-one factors (row and column sums "
                f"of v) have a mean cosine of {_num(cos)}."
            )
        mj = {k: _pair_mean(diag, lambda p, k=k: p["mask_overlap"][k]["overall"]["jaccard"] if p["mask_overlap"][k] else None)
              for k in KINDS}
        mc = _pair_mean(diag, lambda p: p["mask_overlap"]["ffg"]["overall"]["chance"] if p["mask_overlap"]["ffg"] else None)
        if mj["ffg"] is not None:
            out.append(
                f"Entries kept by both experts' FFG masks make up {_pct(mj['ffg'])} of those kept by either "
                f"(independent masks: {_pct(mc)}; magnitude masks: {_pct(mj['magnitude'])})."
            )
    r1 = [e for e in diag["experts"] if e.get("rank1_quality")]
    if r1:
        err = _mean(e["rank1_quality"]["overall"]["rel_error_mean"] for e in r1 if e["rank1_quality"]["overall"])
        agree = _mean(e["rank1_quality"]["overall"]["mask_jaccard"] for e in r1 if e["rank1_quality"]["overall"])
        out.append(
            f"Rank-one compression of the full moments has a mean relative error of {_num(err)} per matrix, and the "
            f"FFG masks it gives agree with the full-moment masks at Jaccard {_num(agree)}."
        )
    return out


# -- summary.md ---------------------------------------------------------------------------------------
def _short(label: str) -> str:
    p = Path(label)
    return p.name or label


def _labels(diag: dict) -> list[str]:
    """Short, unique expert labels for tables and figures."""
    short = [_short(m) for m in diag["models"]]
    if len(set(short)) < len(short):
        short = [f"e{i}:{s}" for i, s in enumerate(short)]
    return short


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _layer_name(layer: int | None) -> str:
    return "non-layer" if layer is None else str(layer)


def render_summary(diag: dict, figures: Sequence[str] = ()) -> str:
    """``summary.md``: Markdown tables of a diagnostics dict and a short reading of them."""
    labels = _labels(diag)
    experts = diag["experts"]
    parts = [
        "# Expert diagnostics",
        "",
        f"Base `{diag['base']}`; {len(experts)} expert(s); FFG and magnitude pruning at density {diag['density']:g} "
        f"(one global threshold per expert); top-{_pct(diag['topk'])} curvature sets per tensor. "
        f"ota_trainer {diag['library_version']}.",
        "",
        "## Reading",
        "",
        " ".join(diag.get("findings") or findings(diag)),
        "",
        "## Experts",
        "",
        _table(
            ["expert", "model", "moments", "FFG density", "FFG log2(theta)", "magnitude density", "tensors without moments"],
            [
                [labels[i], f"`{e['model']}`", e["moments"] or "none",
                 _pct(e["ffg"]["density"]) if e["ffg"] else "n/a",
                 _num(e["ffg"]["threshold_log2"], 2) if e["ffg"] else "n/a",
                 _pct(e["magnitude"]["density"]), e["tensors_without_moments"]]
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
                [role] + [
                    f"{_pct((e['ffg'] or {}).get('by_role', {}).get(role, {}).get('fraction'))} / "
                    f"{_pct(e['magnitude']['by_role'].get(role, {}).get('fraction'))}"
                    for e in experts
                ]
                for role in diag["roles"]
            ],
        ),
        "",
        "## Kept fraction per layer (FFG)",
        "",
    ]
    layer_keys = sorted({rec["layer"] for e in experts for rec in e["magnitude"]["by_layer"]}, key=_layer_order)

    def _layer_fraction(e: dict, kind: str, layer: int | None) -> float | None:
        if not e[kind]:
            return None
        return next((r["fraction"] for r in e[kind]["by_layer"] if r["layer"] == layer), None)

    parts += [
        _table(["layer"] + labels, [[_layer_name(layer)] + [_pct(_layer_fraction(e, "ffg", layer)) for e in experts]
                                    for layer in layer_keys]),
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
            rows.append([labels[i], role,
                         f"{_pct(ffg.get('rows_pruned_fraction'))} / {_pct(mag['rows_pruned_fraction'])}",
                         f"{_pct(ffg.get('cols_pruned_fraction'))} / {_pct(mag['cols_pruned_fraction'])}"])
    parts += [_table(["expert", "role", "rows fully pruned", "columns fully pruned"], rows), ""]
    if diag["pairs"]:
        parts += [
            "## Curvature overlap between experts",
            "",
            f"Jaccard of the top-{_pct(diag['topk'])} entries of v (per tensor, pooled), with the value for independent "
            "sets; cosine of the rank-one factors (row sums, column sums; mean over tensors).",
            "",
            _table(
                ["pair", "Jaccard", "independent", "cos rows", "cos cols"],
                [
                    [f"{labels[p['a']]} / {labels[p['b']]}"] + (
                        [_num(p["curvature"]["overall"][k]) for k in ("jaccard", "chance", "cos_row", "cos_col")]
                        if p["curvature"] else ["n/a"] * 4
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
                    [[_layer_name(layer)] + [
                        _num(next((r["jaccard"] for r in p["curvature"]["by_layer"] if r["layer"] == layer), None))
                        for p in with_curv] for layer in layer_keys],
                ),
                "",
            ]
        parts += [
            "## Mask overlap between experts",
            "",
            "Entries kept by both / kept by either (Jaccard), with the value for independent masks of the same per-tensor densities.",
            "",
            _table(
                ["pair", "FFG", "FFG independent", "magnitude", "magnitude independent"],
                [
                    [f"{labels[p['a']]} / {labels[p['b']]}"] + [
                        _pct(p["mask_overlap"][k]["overall"][f]) if p["mask_overlap"][k] else "n/a"
                        for k in KINDS for f in ("jaccard", "chance")
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
                    [labels[i], role, rec["tensors"], _num(rec["rel_error_mean"]), _num(rec["rel_error_pooled"]),
                     _num(rec["mask_jaccard"], 4)]
                    for i, e in r1
                    for role, rec in list(e["rank1_quality"]["by_role"].items()) + [("all", e["rank1_quality"]["overall"])]
                ],
            ),
            "",
        ]
    if figures:
        parts += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + [""]
    return "\n".join(parts)


# -- figures ----------------------------------------------------------------------------------------
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
    rows = sorted({r["layer"] for r in block["by_layer_role"]}, key=_layer_order)
    roles = [r for r in ROLES if any(c["role"] == r for c in block["by_layer_role"])]
    values = [[math.nan] * len(roles) for _ in rows]
    for c in block["by_layer_role"]:
        if c["fraction"] is not None:
            values[rows.index(c["layer"])][roles.index(c["role"])] = c["fraction"]
    return [_layer_name(r) for r in rows], roles, values


def _annotate(ax, values, fmt="{:.2f}", threshold=0.5, max_cells=400) -> None:
    n = sum(len(r) for r in values)
    if n > max_cells:
        return
    size = 8 if n <= 100 else 6
    for y, row in enumerate(values):
        for x, val in enumerate(row):
            if val is not None and not math.isnan(val):
                ax.text(x, y, fmt.format(val), ha="center", va="center", fontsize=size,
                        color="black" if val > threshold else "white")


def _plot_kept(plt, diag: dict, i: int, label: str, path: Path) -> None:
    e = diag["experts"][i]
    panels = [(k, e[k]) for k in KINDS if e[k]]
    rows, _, _ = _layer_role_matrix(diag, panels[0][1])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.2, max(3.5, 0.32 * len(rows) + 2.0)),
                             squeeze=False, constrained_layout=True)
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
        ax.set_title(f"{titles[kind]}\nkept {_pct(block['density'])} overall")
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
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows + 0.8), squeeze=False, constrained_layout=True)
    bins = diag["hist_bins"]
    centers = [(b + 0.5) / bins for b in range(bins)]
    styles = [("ffg", "row", "C0", "-", "FFG rows"), ("ffg", "col", "C1", "-", "FFG columns"),
              ("magnitude", "row", "0.45", "--", "magnitude rows"), ("magnitude", "col", "0.65", ":", "magnitude columns")]
    handles = {}
    for ax, role in zip(axes.flat, roles):
        pruned = []
        for kind, line, color, ls, name in styles:
            acc = (e[kind] or {}).get("lines", {}).get(role) if e[kind] else None
            if acc is None:
                continue
            total = acc[line + "s"]
            share = [100.0 * c / total if total else 0.0 for c in acc[line + "_hist"]]
            (h,) = ax.plot(centers, share, color=color, linestyle=ls, marker="o" if kind == "ffg" else None, markersize=3)
            handles[name] = h
            if kind == "ffg":
                pruned.append(f"{line}s {_pct(acc[line + 's_pruned_fraction'])}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("kept fraction of the row / column")
        ax.set_ylabel("% of rows / columns")
        ax.set_title(f"{role}" + (f"\nfully pruned (FFG): {', '.join(pruned)}" if pruned else ""), fontsize=9)
        ax.axvline(diag["density"], color="red", linewidth=0.8, alpha=0.6)
    for ax in axes.flat[len(roles):]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"{label}: per-row and per-column kept fraction by role (red line: target density {diag['density']:g})")
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
        (h,) = ax.plot([r["layer"] for r in recs], [r["jaccard"] for r in recs], marker="o", markersize=3,
                       label=f"{labels[p['a']]} / {labels[p['b']]}", color=f"C{k % 10}")
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
    top = _pct(diag["topk"])
    jac = _pair_matrix(diag, lambda p: p["curvature"]["overall"]["jaccard"] if p["curvature"] else None)
    cos = _pair_matrix(diag, lambda p: _mean([p["curvature"]["overall"]["cos_row"], p["curvature"]["overall"]["cos_col"]])
                       if p["curvature"] else None)
    _matrix_panel(plt, fig, axes[0], diag, jac, f"Jaccard of top-{top} v entries (whole model)",
                  "Jaccard index (0 = disjoint, 1 = same set)", labels)
    _matrix_panel(plt, fig, axes[1], diag, cos, "cosine of rank-one factors\n(mean of row-sum and column-sum cosines)",
                  "cosine similarity", labels)
    _per_layer_panel(axes[2], diag, labels, lambda p: p["curvature"], f"Jaccard of top-{top} v entries",
                     "top-curvature Jaccard per layer")
    fig.suptitle(f"Curvature overlap between experts (second moments v, top {top} per tensor)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_mask_overlap(plt, diag: dict, labels: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), constrained_layout=True)
    for ax, kind, name in ((axes[0], "ffg", "FFG"), (axes[1], "magnitude", "magnitude pruning")):
        mat = _pair_matrix(diag, lambda p, k=kind: p["mask_overlap"][k]["overall"]["jaccard"] if p["mask_overlap"][k] else None)
        chance = _mean(p["mask_overlap"][kind]["overall"]["chance"] for p in diag["pairs"] if p["mask_overlap"][kind])
        _matrix_panel(plt, fig, ax, diag, mat, f"{name} masks: kept by both / kept by either\n(independent masks: {_num(chance)})",
                      "Jaccard index of keep masks", labels)
    _per_layer_panel(axes[2], diag, labels, lambda p: p["mask_overlap"]["ffg"], "Jaccard of FFG keep masks",
                     "FFG mask overlap per layer")
    fig.suptitle(f"Mask overlap between experts at density {diag['density']:g}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_rank1(plt, diag: dict, labels: list[str], path: Path) -> bool:
    r1 = [(i, e) for i, e in enumerate(diag["experts"]) if e.get("rank1_quality")]
    if not r1:
        return False
    roles = [r for r in ROLES if any(r in e["rank1_quality"]["by_role"] for _, e in r1)]
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.8 * len(roles) * max(1, len(r1) / 2) + 2.5), 7.5),
                             constrained_layout=True)
    width = 0.8 / len(r1)
    panels = (("rel_error_mean", "relative error\n||v_rank1 − v||_F / ||v||_F",
               "rank-one reconstruction error per role (mean over matrices; 1-D tensors are stored whole)"),
              ("mask_jaccard", "Jaccard of FFG masks\n(full v vs rank-one v)",
               f"FFG mask agreement at density {diag['density']:g} (n/a: neither mask keeps an entry)"))
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
                    ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="0.4", transform=ax.get_xaxis_transform())
        ax.set_ylim(0, max(0.05, 1.1 * top) if key == "rel_error_mean" else 1.02)  # near-zero errors stay visibly near zero
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
    labels = _labels(diag)
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


def write_diagnostics(diag: dict, out_dir: str | os.PathLike, *, plots: bool = True) -> list[Path]:
    """Write ``diagnostics.json``, the figures (unless ``plots=False``) and ``summary.md`` into ``out_dir``.

    Returns:
        The written paths.

    Raises:
        ImportError: ``plots=True`` and matplotlib is not installed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_diagnostics(diag, out) if plots else []
    (out / DIAGNOSTICS_FILE).write_text(json.dumps(diag, indent=1, allow_nan=False) + "\n")
    (out / SUMMARY_FILE).write_text(render_summary(diag, [f.name for f in figures]))
    return [out / DIAGNOSTICS_FILE, out / SUMMARY_FILE, *figures]
