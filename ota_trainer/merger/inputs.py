"""The merge's inputs, opened and validated once, before any backend touches their bytes.

Every file a merge reads comes from a user or from a stranger's Hub repo, so each is hostile
until checked: :func:`open_inputs` opens each model folder and moments file through
:mod:`ota_trainer.io.folders` (every file confined to its folder, every header validated) and
then runs every check that needs no tensor data, in one place for every backend: the
``check_*`` functions compare models with each other and the moments with their weights.

Standard library only (no PyTorch).
"""

from __future__ import annotations

import array
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, FormatError, IncompatibleModelsError, MissingMomentsError, NumericalError, brief
from ..io.folders import ModelLayout, MomentsLayout, open_model, open_moments, open_moments_file  # noqa: F401 - re-exported
from ..io.layout import FLOAT_DTYPES, MOMENTS_DIR, MOMENTS_FILE, ROW_SUFFIX

logger = logging.getLogger(__name__)

__all__ = [
    "ModelLayout",
    "MomentsLayout",
    "open_model",
    "open_moments",
    "open_moments_file",
    "check_compatible",
    "check_moments",
    "check_moments_belong",
    "check_distinct",
    "check_moments_scales",
    "FLOAT_DTYPES",
    "MergeInputs",
    "open_inputs",
]

# Moments written before their weights (OTACallback): weights older than the capture by more
# than this are from an earlier run (a margin for file systems with coarse timestamps).
MTIME_SLACK_S = 2.0
# Experts whose typical second moment differs by more than this factor get a warning.
SCALE_WARN_RATIO = 100.0


def missing_moments_error(model: ModelLayout) -> MissingMomentsError:
    return MissingMomentsError(
        f"{model.label}: no second moments ({MOMENTS_DIR}/{MOMENTS_FILE}). Train the expert with "
        "ota_trainer.OTACallback to produce them, pass --allow-missing-moments to use uniform weights, "
        "or use a method that needs none (linear, task_arithmetic, ties, dare)",
        model=model.label,
    )


# -- checks across models ---------------------------------------------------------------------------
def check_compatible(template: ModelLayout, experts: Sequence[ModelLayout]) -> None:
    """Experts must have the template's architecture, tensor names and shapes, and a floating
    dtype wherever the template has one (the bytes of an integer tensor are not an edit of a
    float one); integer tensors, which the merge copies from the template, must match its dtype.

    Raises:
        IncompatibleModelsError: naming the model and the first offending tensors.
    """
    arch = template.architectures
    for e in experts:
        if arch and e.architectures and e.architectures != arch:
            raise IncompatibleModelsError(
                f"{e.label}: architecture {brief(e.architectures)} differs from the base's {brief(arch)}", model=e.label
            )
        missing = [n for n in template.tensors if n not in e.tensors]
        if missing:
            raise IncompatibleModelsError(
                f"{e.label}: lacks {len(missing)} tensor(s) the base has, e.g. {brief(missing[:3])}",
                tensor=missing[0],
                model=e.label,
            )
        extra = [n for n in e.tensors if n not in template.tensors]
        if extra:
            raise IncompatibleModelsError(
                f"{e.label}: has {len(extra)} tensor(s) the base lacks, e.g. {brief(extra[:3])} "
                "(was it saved with untied or extra weights?)",
                tensor=extra[0],
                model=e.label,
            )
        for n, info in template.tensors.items():
            got = e.tensors[n]
            if got.shape != info.shape:
                hint = ""
                if len(got.shape) == 2 and got.shape[1:] == info.shape[1:] and ("embed" in n or "lm_head" in n):
                    hint = (
                        f" (the vocabulary was resized: {got.shape[0]} vs {info.shape[0]} rows; merge experts that "
                        "share the base's tokenizer, or resize the base's embeddings the same way first)"
                    )
                raise IncompatibleModelsError(
                    f"{e.label}: tensor {brief(n)} has shape {got.shape}, the base has {info.shape}{hint}",
                    tensor=n,
                    model=e.label,
                )
            if (info.dtype in FLOAT_DTYPES) != (got.dtype in FLOAT_DTYPES) or (
                info.dtype not in FLOAT_DTYPES and got.dtype != info.dtype
            ):
                raise IncompatibleModelsError(
                    f"{e.label}: tensor {brief(n)} is {got.dtype}, the base's is {info.dtype}: "
                    "a merge needs floating weights in both (or the same integer type)",
                    tensor=n,
                    model=e.label,
                )


def check_moments(model: ModelLayout, moments: MomentsLayout, names: Sequence[str], *, allow_missing: bool) -> None:
    """Moments must be for this model (names and shapes) and cover every merged tensor.

    Raises:
        IncompatibleModelsError: moments name a tensor the model lacks, or shapes differ.
        MissingMomentsError: a merged tensor has no moments and ``allow_missing`` is false.
    """
    for n, shape in moments.shapes.items():
        if n not in model.tensors:
            raise IncompatibleModelsError(
                f"{moments.path}: moments for {brief(n)}, which {model.label} does not have: "
                "these moments were written for a different model",
                tensor=n,
                model=model.label,
            )
        if tuple(shape) != model.tensors[n].shape:
            raise IncompatibleModelsError(
                f"{moments.path}: moments for {brief(n)} have shape {tuple(shape)}, "
                f"the weights {model.tensors[n].shape}: "
                "these moments were written for a different model",
                tensor=n,
                model=model.label,
            )
    missing = [n for n in names if n not in moments.stored]
    if missing:
        if not allow_missing:
            raise MissingMomentsError(
                f"{moments.path}: no second moments for {len(missing)} tensor(s) of {model.label}, "
                f"e.g. {brief(missing[:3])} "
                "(frozen during training?); pass --allow-missing-moments to use uniform curvature for them",
                tensor=missing[0],
                model=model.label,
            )
        logger.warning(
            "%s: no moments for %d tensor(s) (e.g. %s); uniform curvature used there",
            model.label,
            len(missing),
            brief(missing[:3]),
        )


def check_moments_belong(model: ModelLayout, moments: MomentsLayout) -> None:
    """The moments belong to these weights, as far as the files can tell: the training step the
    moments were captured at equals ``trainer_state.json``'s (when the folder has one), and
    moments that OTACallback wrote before their weights (``written_before_weights``) are not
    newer than every weight file (which happens when a run was killed after the capture and
    before the save, in a folder holding an earlier run's weights).

    Raises:
        IncompatibleModelsError: naming the expert, both steps or both times, and the fix.
    """
    meta = moments.metadata
    step = meta.get("global_step")
    if model.trainer_steps is not None and step is not None:
        current, best = model.trainer_steps
        # load_best_model_at_end: the folder holds the best checkpoint's weights and moments
        if step != current and not (meta.get("load_best_model_at_end") and step == best):
            raise IncompatibleModelsError(
                f"{model.label}: its moments were captured at training step {step}, its trainer_state.json is at step "
                f"{current}: the moments belong to other weights (a run killed between capture and save, or files "
                "copied from different checkpoints); capture the moments again with the weights they belong to",
                model=model.label,
            )
    captured = meta.get("captured_at")
    if meta.get("written_before_weights") and captured is not None:
        newest = max((os.stat(p).st_mtime for p in model.weight_paths), default=None)
        if newest is not None and newest < captured - MTIME_SLACK_S:
            raise IncompatibleModelsError(
                f"{model.label}: its moments were captured after its weights were last written "
                f"({captured - newest:.0f} s later), but OTACallback writes moments before the weights they belong to: "
                "these weights are from an earlier run (was training killed before save_model?); save the trained "
                "weights again, or capture the moments again",
                model=model.label,
            )


def check_distinct(refs: Sequence[str], folders: Sequence[Path]) -> None:
    """The same expert may not be listed twice (it would count double, silently).

    Raises:
        ConfigError: naming both entries and the fix.
    """
    seen: dict[Path, str] = {}
    for ref, folder in zip(refs, folders):
        if folder in seen:
            raise ConfigError(
                f"expert {brief(ref)} is listed twice (also as {brief(seen[folder])}, the same folder {folder}); "
                "list it once and give it `weight: 2` to count it double"
            )
        seen[folder] = ref


# -- what the moments say about themselves: all zero, and their scale --------------------------------
def _sum_non_negative(f, start: int, end: int) -> float | None:
    """The sum of the float32 values at ``[start, end)`` of an open file, or None when one of them
    is negative or NaN (the merge then names the tensor). Sign bits are read from the raw bytes
    (little-endian: the top bit of every fourth byte), a C-speed test."""
    f.seek(start)
    raw = f.read(end - start)
    if raw[3::4].translate(None, _LOW_BYTES):  # a sign bit set: negative (or -0.0, -NaN)
        return None
    values = array.array("f")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    total = sum(values)
    return total if math.isfinite(total) else None


_LOW_BYTES = bytes(range(128))


def moments_level(moments: MomentsLayout, bias_correction: bool) -> tuple[bool, dict[str, float]]:
    """Whether the file holds any non-zero moment, and each parameter's mean second moment (as
    the merge reads it, bias correction applied) where that is cheap to know: from the row sums
    of rank-one entries (``sum(r) = sum(v)``) and from 1-D entries (a fraction of a percent of
    the weights). Entries stored whole with 2+ dimensions are read only when every cheap entry
    is zero (to tell an all-zero file for sure). NaN, Inf and negative values are left to the
    merge, which names the tensor."""
    scale = moments.scale(bias_correction)
    means: dict[str, float] = {}
    nonzero = False
    big = []
    with open(moments.path, "rb") as f:
        for name, shape in moments.shapes.items():
            if moments.stored[name] == "rank1":
                total = _sum_non_negative(f, *moments.span(name + ROW_SUFFIX))
            elif len(shape) < 2:
                total = _sum_non_negative(f, *moments.span(name))
            else:
                big.append(name)
                continue
            if total is None:
                continue
            nonzero = nonzero or total > 0
            if math.prod(shape):
                means[name] = total * scale / math.prod(shape)
    if not nonzero and big:  # every cheap entry is zero (a rare, damaged file): are the whole ones too?
        with open(moments.path, "rb") as f:
            for name in big:
                start, end = moments.span(name)
                f.seek(start)
                while start < end and not nonzero:
                    values = array.array("f")
                    values.frombytes(f.read(min(end - start, 1 << 22)))
                    start += 4 * len(values)
                    nonzero = any(values) or not values  # (-0.0 is zero; NaN is not, and the merge names it)
                if nonzero:
                    break
    return nonzero, means


def check_moments_scales(labels: Sequence[str], levels: Sequence[tuple[bool, dict[str, float]]]) -> None:
    """All-zero moments are an error; experts whose moments differ in scale by orders of
    magnitude get a warning (their edits would count for little or for everything in OTA's
    curvature-weighted average).

    Raises:
        NumericalError: an expert's moments are all zero.
    """
    for label, (nonzero, _) in zip(labels, levels):
        if not nonzero:
            raise NumericalError(
                f"{label}: its second moments are all zero (an optimizer that never stepped, or a broken capture): "
                "OTA would give its edits no weight. Capture them again, or merge with a method that needs no "
                "moments (linear, task_arithmetic, ties, dare)",
                model=label,
            )
    known = [(label, means) for label, (_, means) in zip(labels, levels) if means]
    if len(known) < 2:
        return
    ref_label, ref = max(known, key=lambda x: len(x[1]))
    offsets = []  # per expert: median over shared tensors of log2(its mean / the reference's)
    for label, means in known:
        diffs = sorted(math.log2(v / ref[n]) for n, v in means.items() if v > 0 and ref.get(n, 0) > 0)
        if diffs:
            offsets.append((diffs[len(diffs) // 2], label))
    if len(offsets) < 2:
        return
    (lo, lo_label), (hi, hi_label) = min(offsets), max(offsets)
    ratio = 2.0 ** (hi - lo)
    if ratio > SCALE_WARN_RATIO:
        logger.warning(
            "the experts' second moments differ in scale by %.3gx (%s's are %.3gx %s's, the median over the tensors "
            "they share): OTA weighs each entry by its curvature, so %s's edits count for little wherever both edit. "
            "Different learning rates, batch sizes, max_grad_norm or loss scales do this; `normalise: mean` "
            "(--normalise mean) rescales each expert's curvature per tensor",
            ratio,
            hi_label,
            ratio,
            lo_label,
            lo_label,
        )


def training_settings(moments: MomentsLayout) -> dict[str, float]:
    """What the capture recorded of an expert's training that sets the scale of Adam's second
    moments: learning rate, ``max_grad_norm`` and the effective batch size (numbers only: the
    metadata is untrusted; a key that is missing or not a finite number is left out)."""
    t = moments.metadata.get("training")
    if not isinstance(t, dict):
        return {}

    def num(key: str) -> float | None:
        v = t.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    out = {k: v for k in ("learning_rate", "max_grad_norm") if (v := num(k)) is not None}
    parts = [num(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")]
    if all(p is not None for p in parts):
        out["effective batch size"] = math.prod(parts)
    return out


def check_training_settings(labels: Sequence[str], settings: Sequence[dict[str, float]]) -> None:
    """A warning naming the experts and values when they were trained with different learning
    rates, gradient clipping or batch sizes: their second moments, OTA's curvature, are then on
    different scales and the merge weighs their edits unevenly."""
    diffs = []
    for key in ("learning_rate", "max_grad_norm", "effective batch size"):
        values = [(label, s[key]) for label, s in zip(labels, settings) if key in s]
        if len(values) >= 2 and len({v for _, v in values}) > 1:
            (lo_l, lo), (hi_l, hi) = min(values, key=lambda x: x[1]), max(values, key=lambda x: x[1])
            ratio = f"{hi / lo:.3g}x" if lo > 0 else "unbounded"
            diffs.append(f"{key} {hi:g} ({hi_l}) vs {lo:g} ({lo_l}), {ratio}")
    if diffs:
        logger.warning(
            "the experts were trained with different settings (%s): Adam's second moments, OTA's curvature, then "
            "differ in scale between experts, and the merge weighs one expert's edits above another's for that "
            "reason alone; `normalise: mean` (--normalise mean) rescales each expert's curvature per tensor",
            "; ".join(diffs),
        )


# -- a merge's inputs, all together --------------------------------------------------------------------
@dataclass
class MergeInputs:
    """Everything a merge reads, opened and checked (:func:`open_inputs`).

    Attributes:
        base: the base model (None for methods without one).
        experts: the experts, in recipe order.
        moments: each expert's moments (None where the method needs none, or none were found
            and missing moments are allowed).
        float_names: the template's floating tensors in on-disk order (the ones merged;
            others are copied from the template).
        shipped: each expert's FFG histogram shipped beside its moments, validated (None where
            it ships none, or a grafting method does not use one: :mod:`.ffg_shipped`).
    """

    base: ModelLayout | None
    experts: list[ModelLayout]
    moments: list[MomentsLayout | None]
    float_names: list[str]
    shipped: list = field(default_factory=list)

    @property
    def template(self) -> ModelLayout:
        """The model whose names, shapes, config and side files the output takes."""
        return self.base or self.experts[0]


def _open(resolver, ref: str) -> ModelLayout:
    """The model ``ref`` stands for: the folder the resolver gives, opened and validated, or the
    layout it built itself (a LoRA adapter's expert: :class:`~.adapters.AdapterExperts`)."""
    found = resolver(ref)
    return found if isinstance(found, ModelLayout) else open_model(found, ref)


def open_inputs(recipe, resolver) -> MergeInputs:
    """Open and check every input of a recipe (a :class:`~ota_trainer.merger.recipe.MergeRecipe`):
    ``resolver`` turns each model reference into a local folder (downloading repo ids).

    Runs every check that needs no tensor data, in one place for every backend: each folder's
    files confined and their headers validated, the template's ``config.json`` present, no
    expert listed twice, names/shapes/dtypes agreeing, moments present, valid, for these weights
    (names, shapes, training step, capture time), not all zero, and of comparable scale.

    Raises:
        FormatError, ConfigError, IncompatibleModelsError, MissingMomentsError, NumericalError.
    """
    experts = [_open(resolver, m.model) for m in recipe.models]
    base = open_model(resolver(recipe.base_model), recipe.base_model) if recipe.base_model else None
    template = base or experts[0]
    if not template.has_config:
        raise FormatError(
            f"{template.label}: no config.json in {template.path}; the merged model takes its config from "
            f"{'the base' if base else 'the first expert'} and would not load without one",
            path=str(template.path),
        )
    check_distinct([m.model for m in recipe.models], [e.path for e in experts])
    check_compatible(template, experts if base else experts[1:])
    float_names = [n for n in template.names if template.tensors[n].dtype in FLOAT_DTYPES]
    moments: list[MomentsLayout | None] = [None] * len(experts)
    if recipe.spec.needs_moments:
        bias = recipe.method_parameters().get("bias_correction", True)
        for i, e in enumerate(experts):
            moments[i] = open_moments(e)
            if moments[i] is None:
                if not recipe.allow_missing_moments:
                    raise missing_moments_error(e)
                logger.warning("%s: no second moments; uniform curvature is used for all its parameters", e.label)
                continue
            check_moments(e, moments[i], float_names, allow_missing=recipe.allow_missing_moments)
            check_moments_belong(e, moments[i])
        found = [(e.label, m) for e, m in zip(experts, moments) if m is not None]
        check_moments_scales([label for label, _ in found], [moments_level(m, bias) for _, m in found])
        if recipe.method_parameters().get("normalise") != "mean":
            check_training_settings([label for label, _ in found], [training_settings(m) for _, m in found])
    shipped = [None] * len(experts)
    for i in recipe.global_threshold_experts():
        if moments[i] is not None:
            from .ffg_shipped import open_shipped

            shipped[i] = open_shipped(experts[i])
    return MergeInputs(base, experts, moments, float_names, shipped)
