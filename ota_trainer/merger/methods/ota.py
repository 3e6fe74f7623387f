"""OTA + Fast Fisher Grafting (Mahdavi et al., arXiv 2509.11167; method.md §3-4).

FFG first reverts each expert's low-saliency edits: ``M_t = s_t >= theta_t`` with the saliency
``s_t = v_t d_t^2`` (``score: magnitude``: ``d_t^2``) and ``theta_t`` from a global density (one
histogram pass over all the expert's parameters, run by the runner before merging), an absolute
threshold, or a per-tensor density (ablation). OTA then averages the kept edits with curvature
weights: ``W_t = c_t (v_t^p + eps) M_t``, ``merged = w0 + sum_t W_t d_t / sum_t W_t`` (``w0``
where every mask is 0). ``elect_sign`` (ours) then keeps, per entry, only the kept edits that
agree with the sign of ``sum_t W_t d_t``, TIES's sign election with curvature weights.

Defaults: the quality benchmark's dev-split choice (README, Quality): FFG keeps the fewest top
edits holding 99% of each expert's saliency (``saliency_share: 0.99``), power 0.5, no sign
election; the native kernels run it. The paper's recipe is ``density: 0.4``.
"""

from __future__ import annotations

from .base import BIAS_CORRECTION, EPSILON, POSITIVE_WEIGHT, SCORES, MergeMethod, Param, in_unit, non_negative

PARAMS = (
    Param("graft", bool, True, "apply Fast Fisher Grafting before aggregation (false: OTA without FFG)"),
    Param(
        "density",
        float,
        None,
        "fraction of each expert's entries FFG keeps (global over the expert; the paper's recipe: 0.4)",
        per_model=True,
        check=in_unit,
        optional=True,
    ),
    Param(
        "threshold",
        float,
        None,
        "absolute FFG saliency threshold theta (the paper's configs); excludes density",
        per_model=True,
        check=non_negative,
        optional=True,
    ),
    Param(
        "saliency_share",
        float,
        None,
        "keep the fewest top edits holding this share of the expert's total saliency "
        "sum(v*d^2); excludes density/threshold (default 0.99 when no rule is given)",
        per_model=True,
        check=in_unit,
        optional=True,
    ),
    Param("per_tensor", bool, False, "apply density per tensor instead of globally (ablation)"),
    Param("score", str, "fisher", "FFG saliency: fisher = v*d^2, magnitude = d^2 (ablation)", choices=SCORES),
    Param(
        "power",
        float,
        0.5,
        "p in P_t = v_t**p",
        check=lambda x: (
            None if 0 <= x <= 2 else "must be in [0, 2] (0: uniform weights, 0.5: the paper's, 1: Fisher's)"
        ),
    ),
    EPSILON,
    Param("normalise", str, "none", "per-tensor normalisation of P_t", choices=("none", "mean")),
    Param(
        "elect_sign",
        bool,
        False,
        "curvature-weighted sign election (ours, not the paper's): per entry keep only the kept "
        "edits whose sign is that of sum_t W_t d_t, as TIES does with magnitudes (PyTorch backend)",
    ),
    BIAS_CORRECTION,
    POSITIVE_WEIGHT,
)


def ota_weights(v, power: float, epsilon: float, normalise: str):
    """``P_t + eps`` with ``P_t = v_t ** power``, optionally divided by its mean (``normalise="mean"``)."""
    from ...backends.torch.ops import Curvature

    m = v.reshape(v.shape[0], -1) if v.dim() >= 1 else v.reshape(1, 1)
    return Curvature.full(m, power, normalise).weights(slice(None), epsilon).reshape(v.shape)


def ota_weights_rank1(a, b, shape, power: float, epsilon: float, normalise: str):
    """:func:`ota_weights` of a rank-one ``v = outer(a, b)``, from its factors (see
    :class:`~ota_trainer.backends.torch.ops.Curvature`)."""
    from ...backends.torch.ops import Curvature

    return Curvature.rank1(a, b, power, normalise).weights(slice(None), epsilon).reshape(tuple(shape))


def ota_merge(
    base, deltas, moments, masks, weights, *, power: float = 0.5, epsilon: float = 1e-26, normalise: str = "none"
):
    """OTA aggregation of whole float32 tensors (method.md §4): curvature-weighted average of task vectors.

    ``W_t = c_t (v_t**p + eps) M_t``;  ``merged = w0 + sum_t W_t d_t / sum_t W_t``,
    and ``w0`` where ``sum_t W_t == 0`` (every expert's edit was reverted).

    A ``None`` moment means uniform curvature (``P_t = 1``) for that tensor; a ``None`` mask
    keeps every edit. Equal curvature gives the plain average of the kept task vectors.
    """
    import torch

    from ...backends.torch.ops import OTAAccumulator

    acc = OTAAccumulator(base.to(torch.float32), epsilon=epsilon)
    for d, v, m, c in zip(deltas, moments, masks, weights):
        acc.add(d, ota_weights(v, power, epsilon, normalise) if v is not None else None, m, c)
    return acc.result()


def merge_torch(job):
    """OTA (+ FFG masks) of one tensor in its (m, n) view; the entries each mask kept go to
    ``job.kept``. With the native kernels on PyTorch tensors when they read these dtypes, else
    block by block, one expert at a time (peak memory does not grow with the number of experts);
    both give the same bits."""
    import torch

    from ...backends.torch.ffg import keep_mask, per_tensor_threshold
    from ...backends.torch.ops import OTAAccumulator

    p = job.params
    w0r, experts = job.w0, job.experts
    moments = [job.moment(i) for i in range(len(experts))]
    scores = [None] * len(experts)  # FFG: (score, threshold) from each expert's own moments
    if job.grafting:
        for i, (e, mo) in enumerate(zip(experts, moments)):
            sc, thr = job.score(mo), job.thresholds[i]
            if sc is not None and thr is None:  # per-tensor density (ablation): a threshold on the whole tensor
                thr = per_tensor_threshold(
                    sc.block(torch.sub(e, w0r.float()), slice(None)), job.model_params[i]["density"]
                )
            if sc is not None and thr is not None and not thr.keeps_all:  # None: no evidence to prune
                scores[i] = (sc, thr)
    curvatures = job.curvatures(p["power"], p["normalise"])
    if job.native_ops is not None and not p["elect_sign"]:
        out, job.kept, finite = job.native_ops.ota_merge(
            w0r,
            experts,
            [s[0] if s else None for s in scores],
            [s[1].value if s else 0.0 for s in scores],
            curvatures,
            job.coefs,
            epsilon=p["epsilon"],
            out_dtype=job.out_dtype,
            out=job.out(),
        )
        return out if finite else job.non_finite()
    kept = [0] * len(experts)

    def block(rows: slice):
        w0 = w0r[rows].float()
        elected = None
        if p["elect_sign"]:  # the sign of the OTA numerator, from a first pass over the experts
            votes = OTAAccumulator(w0, epsilon=p["epsilon"])
            for i, (e, c) in enumerate(zip(experts, curvatures)):
                d = torch.sub(e[rows], w0)
                mask = keep_mask(scores[i][0].block(d, rows), scores[i][1]) if scores[i] else None
                votes.add(d, c.weights(rows, p["epsilon"]), mask, job.coefs[i])
            elected = torch.sign(votes.num) if votes.num is not None else None
            del votes
        acc = OTAAccumulator(w0, epsilon=p["epsilon"])
        for i, (e, c) in enumerate(zip(experts, curvatures)):
            d = torch.sub(e[rows], w0)
            mask = keep_mask(scores[i][0].block(d, rows), scores[i][1]) if scores[i] else None
            kept[i] += int(torch.count_nonzero(mask)) if mask is not None else d.numel()
            if elected is not None:
                agree = torch.sign(d) == elected
                mask = agree if mask is None else mask & agree
            acc.add(d, c.weights(rows, p["epsilon"]), mask, job.coefs[i])
            del d, mask
        return acc.result()

    out = job.blockwise(block)
    job.kept = kept
    return out


def merge_native(job) -> bool:
    """The same on raw addresses (``ota_merge_rows`` in kernels.c); rank-one factors prepared by
    the backend as the PyTorch path prepares them."""
    from ...backends import native

    factors = [job.factors(i) for i in range(len(job.experts))]
    magnitude = job.params["score"] == "magnitude"
    sc = [
        f.score(magnitude) if job.cuts[i] is not None else (native.S_NONE, None, None, None)
        for i, f in enumerate(factors)
    ]
    cv = [f.curvature() for f in factors]
    job.kept, finite = native.raw_ota_merge(
        job.w0[0],
        job.w0[1],
        job.m,
        job.n,
        job.experts,
        [s[0] for s in sc],
        [s[1] for s in sc],
        [s[2] for s in sc],
        [s[3] for s in sc],
        [c if c is not None else 0.0 for c in job.cuts],
        [c[0] for c in cv],
        [c[1] for c in cv],
        [c[2] for c in cv],
        [c[3] for c in cv],
        job.params["power"] == 0.5,
        [0.0] * len(factors),
        job.coefs,
        job.params["epsilon"],
        job.out,
        job.out_code,
        job.threads,
        checks=job.checks,
        checked=job.checked,
        modes=job.check_modes,
        masses=job.masses,
    )
    return finite


def native_covers(recipe, inputs) -> str | None:
    """The kernels compute ``v^p`` for p = 1/2 and 1, without normalisation, with global or
    absolute FFG thresholds, from moments of every merged tensor."""
    p = recipe.method_parameters()
    if p["power"] not in (0.5, 1.0) or p["normalise"] != "none" or p["per_tensor"]:
        return "power, normalise or per-tensor density the kernels do not cover"
    if p["elect_sign"]:
        return "elect_sign (PyTorch only)"
    if any(m is None or any(n not in m.stored for n in inputs.float_names) for m in inputs.moments):
        return "moments missing for some tensors"
    return None


METHOD = MergeMethod(
    "ota",
    "OTA + Fast Fisher Grafting",
    "https://arxiv.org/abs/2509.11167",
    description="FFG mask M_t = v_t d_t² >= θ_t; W_t = c_t (v_t^p + ε) M_t; "
    "w0 + Σ W_t d_t / Σ W_t (w0 where Σ W_t = 0); elect_sign: only the W_t d_t whose sign is "
    "that of Σ W_t d_t",
    needs_base=True,
    needs_moments=True,
    params=PARAMS,
    torch=merge_torch,
    native=merge_native,
    native_covers=native_covers,
    grafts=True,
    native_checks=True,
    order=10,
)
