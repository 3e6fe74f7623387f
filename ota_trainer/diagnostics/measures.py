"""The numbers: where Fast Fisher Grafting cuts and how experts' curvature overlaps.

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

:class:`Inspector` computes all of them in two streaming passes and returns plain
JSON-serialisable data (nothing here renders text or figures). The pure tensor functions
(:func:`parse_name`, :func:`top_fraction_mask`, :func:`overlap_counts`, :func:`jaccard`,
:func:`cosine`, :func:`line_kept_fractions`, :func:`fraction_histogram`,
:func:`rank1_relative_error`) do no I/O.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..backends.torch.ffg import SaliencyHistogram, Threshold, keep_mask, saliency
from ..io.checkpoint import ModelFolder
from ..merger.inputs import check_compatible, check_moments, open_moments
from ..moments.compress import matrix_shape, rank1_factors, rank1_reconstruct
from ..moments.format import MomentsReader

logger = logging.getLogger(__name__)

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "other")
KINDS = ("ffg", "magnitude")  # mask kinds: fisher saliency (FFG) and the magnitude ablation
HIST_BINS = 20  # bins of width 1/20 over [0, 1] for per-row/column kept fractions
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


def layer_order(layer: int | None) -> tuple[int, int]:
    return (1, 0) if layer is None else (0, layer)


def _cell_order(cell: tuple[int | None, str]) -> tuple:
    layer, role = cell
    return (*layer_order(layer), ROLES.index(role))


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
        "by_layer": [{"layer": layer, **make(by_layer[layer])} for layer in sorted(by_layer, key=layer_order)],
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


class Inspector:
    """Two streaming passes over base + experts + moments (one tensor name at a time)."""

    def __init__(
        self,
        base: str,
        experts: Sequence[str],
        *,
        density: float,
        topk: float,
        bias_correction: bool,
        resolver: Resolver,
        quiet: bool,
    ):
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
                logger.warning(
                    "%s: no moments for %d tensor(s) (e.g. %s); FFG keeps those whole, as the merge engine does",
                    e.label,
                    len(missing),
                    missing[:3],
                )
            self.moments.append(m)
            self.missing.append(len(missing))
        self.full = [m is not None and m.metadata["compression"] == "full" for m in self.moments]
        t = len(self.experts)
        self.thresholds: dict[str, list[Threshold | None]] = {
            "ffg": [None] * t,
            "magnitude": [None] * t,
            "rank1": [None] * t,
        }
        self.kept = [{k: _tally() for k in KINDS} for _ in range(t)]
        self.lines = [
            {
                k: defaultdict(
                    lambda: {
                        "rows": 0,
                        "rows_pruned": 0,
                        "row_hist": [0] * HIST_BINS,
                        "cols": 0,
                        "cols_pruned": 0,
                        "col_hist": [0] * HIST_BINS,
                    }
                )
                for k in KINDS
            }
            for _ in range(t)
        ]
        self.rank1 = [_tally() for _ in range(t)]
        self.rank1_tensors: list[list[dict]] = [[] for _ in range(t)]
        self.pairs = [(a, b) for a in range(t) for b in range(a + 1, t)]
        self.curvature = {p: _tally() for p in self.pairs}
        self.mask_overlap = {p: {k: _tally() for k in KINDS} for p in self.pairs}
        self.tensors: list[dict] = []

    def close(self) -> None:
        """Close every file the inspection opened."""
        for f in [self.base, *self.experts, *(m for m in self.moments if m is not None)]:
            f.close()

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
                masks["ffg"][i] = (
                    keep_mask(saliency(d, v), self.thresholds["ffg"][i])
                    if v is not None
                    else torch.ones_like(d, dtype=torch.bool)
                )
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
                    self.rank1_tensors[i].append(
                        {
                            "name": name,
                            "layer": cell[0],
                            "role": cell[1],
                            "rel_error": rel,
                            "mask_jaccard": _ratio(both, either),
                        }
                    )
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
        self.tensors.append(
            {
                "name": name,
                "layer": cell[0],
                "role": cell[1],
                "shape": list(w0.shape),
                "ffg_kept": [float(m.sum()) / n if m is not None else None for m in masks["ffg"]],
                "magnitude_kept": [float(m.sum()) / n for m in masks["magnitude"]],
                "rank1_rel_error": rank1_err,
            }
        )

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
            pairs.append(
                {
                    "a": a,
                    "b": b,
                    "models": [self.experts[a].label, self.experts[b].label],
                    "curvature": _records(self.curvature[(a, b)], _curvature_record)
                    if self.curvature[(a, b)]
                    else None,
                    "mask_overlap": {
                        k: (
                            _records(self.mask_overlap[(a, b)][k], _overlap_record)
                            if self.mask_overlap[(a, b)][k]
                            else None
                        )
                        for k in KINDS
                    },
                }
            )
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
