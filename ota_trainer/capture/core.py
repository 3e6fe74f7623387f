"""Capture without a Trainer: read a model's optimizer second moments and write them (format v1).

:func:`save_optimizer_moments` is what :class:`~ota_trainer.capture.OTACallback` calls; use it
directly in a custom training loop, e.g. with an FSDP2 model (``fully_shard``)::

    save_optimizer_moments("out/expert", model, optimizer, metadata={"base_model": "HuggingFaceTB/SmolLM2-135M"})
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CaptureError, ConfigError, OTAError
from ..moments.format import COMPRESSIONS, Rank1Factors, bias_correction_factor, save_moments
from .conversion import SavedLayout
from .names import NamedParameter, clean_parameter_name, named_trainable_parameters
from .sources import (
    CapturedMoment,
    OptimizerInfo,
    detect_engine,
    inspect_optimizer,
    iter_second_moments,
    optimizer_hyperparameters,
    saves_tied_aliases,
    state_of,
)

logger = logging.getLogger(__name__)

__all__ = ["save_optimizer_moments", "capture_metadata", "bias_correction_scale", "BIAS_CORRECTION"]

BIAS_CORRECTION = ("record", "apply")


def bias_correction_scale(beta2: float | None, step: int | None, *, optimizer: str = "the optimizer") -> float:
    """Adam's bias correction of the second moment: ``1 / (1 - beta2**step)``.

    Raises:
        ConfigError: ``beta2`` or ``step`` unknown (e.g. Adafactor, whose average is unbiased
            by construction), or ``step == 0``.
    """
    if beta2 is None or not step or not 0.0 <= float(beta2) < 1.0:
        raise ConfigError(
            f"bias_correction='apply' needs Adam's beta2 and a step > 0; {optimizer} has beta2={beta2}, "
            f"step={step}. Use bias_correction='record' (the default)"
        )
    return bias_correction_factor(beta2, step)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _MomentStream(Mapping[str, torch.Tensor]):
    """A one-pass mapping ``name -> v`` over captured moments, for :func:`save_moments`.

    ``items()`` pulls one parameter at a time from the capture iterator (so sharded reads
    and the writer advance together and only one full tensor is alive at once). Entries
    read as rank-one sums become ``outer(r, c) / sum(r)``, whose row and column sums are
    ``r`` and ``c`` again, so ``save_moments(..., compression="rank1")`` stores them back.
    """

    def __init__(
        self, entries: Iterator[CapturedMoment | None], names: list[str], *, aliases: bool = False, scale: float = 1.0
    ):
        self._entries = entries
        self._names = names
        self._aliases = aliases
        self._scale = scale

    def items(self):  # type: ignore[override]
        k = self._scale
        for e in self._entries:
            if e is None:
                continue
            if e.full is not None:
                v = e.full * k if k != 1.0 else e.full  # never in place: it may be the optimizer's own tensor
            else:
                r, c = e.factors
                if k != 1.0:  # both sums are linear in v
                    r, c = r * k, c * k
                v = Rank1Factors(r, c, tuple(e.shape))  # stored exactly, never reconstructed
            yield e.name, v
            for alias in e.aliases if self._aliases else ():
                yield alias, v  # one optimizer state, saved under each name the weights use

    def __getitem__(self, name: str) -> torch.Tensor:
        raise KeyError(f"{name}: a moment stream is read once, in order, through items()")

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def capture_metadata(
    info: OptimizerInfo,
    engine: str,
    params: list[NamedParameter],
    frozen: list[str],
    without_state: list[str],
    *,
    compression: str,
    stored_compression: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata written beside the moments (on top of the format's own keys).

    Holds the optimizer (name, class, family, ``beta2``, ``betas``, ``eps``, ``step``), the
    engine and world size, the frozen parameters, the parameters the optimizer had no state
    for, the tied aliases, and ``extra`` (base model, Trainer step...), which wins on
    conflicts except for ``step`` when the optimizer reports one.
    """
    hyper = optimizer_hyperparameters(info)
    _, world = _dist_rank_world()
    meta: dict[str, Any] = {
        "optimizer": info.class_name,
        "optimizer_class": info.class_name,
        "optimizer_family": info.family,
        "capture_engine": engine,
        "world_size": world,
        "frozen_parameters": list(frozen),
        "parameters_without_state": list(without_state),
        "tied_parameters": {alias: p.name for p in params for alias in p.aliases},
        "bias_corrected": False,
    }
    meta.update(hyper)
    if stored_compression != compression:
        meta["requested_compression"] = compression
        meta["compression_note"] = (
            f"{info.class_name} keeps only factored (row/column) second moments for matrices; "
            "they are stored as rank-one sums"
        )
    optimizer_step = meta.get("step")
    meta.update(dict(extra or {}))
    if optimizer_step is not None:
        meta["step"] = optimizer_step
    return meta


def _frozen_shapes(model: torch.nn.Module, frozen: list[str]) -> dict[str, tuple[int, ...]]:
    """The frozen parameters' shapes, by the names :func:`named_trainable_parameters` gave them."""
    want = set(frozen)
    return {
        n: tuple(p.shape)
        for raw, p in model.named_parameters()
        if (n := clean_parameter_name(raw)) in want and not p.requires_grad
    }


def _saved(layout: SavedLayout, names: list[str], skip: set[str] = frozenset()) -> list[str]:
    """``names`` as saved (converted names in their place), each once, in order; ``skip``: held
    names left out."""
    out: dict[str, None] = {}
    for n in names:
        if n not in skip:
            out.update(dict.fromkeys(layout.saved_names(n)))
    return list(out)


def save_optimizer_moments(
    folder: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Any,
    *,
    compression: str = "rank1",
    metadata: Mapping[str, Any] | None = None,
    write: bool | None = None,
    tied_aliases: bool | None = None,
    bias_correction: str = "record",
) -> Path | None:
    """Read the second moment of every trainable parameter and write ``<folder>/ota/moments.safetensors``.

    Moments are keyed by the names the weights are saved under (see
    :mod:`ota_trainer.capture.names`): tied weights once, frozen parameters not at all
    (listed in the metadata as ``frozen_parameters``). Values are the optimizer's raw,
    biased ``exp_avg_sq`` (``bias_corrected: false``, with ``beta2`` and ``step`` recorded
    so the merger can apply ``v / (1 - beta2**step)``).

    Under FSDP2 and DeepSpeed this is COLLECTIVE: call it on every rank; with ``"rank1"``
    each tensor's row and column sums are reduced (O(m + n)) instead of gathering it.

    Args:
        folder: checkpoint folder; the file goes to ``<folder>/ota/moments.safetensors``.
        model: the model whose parameters the optimizer updates (wrappers allowed).
        optimizer: the optimizer (accelerate's wrapper and DeepSpeed's ZeRO optimizer allowed).
        compression: ``"rank1"`` or ``"full"``. Adafactor keeps only row/column statistics
            for matrices: ``"full"`` then stores those as ``rank1`` (recorded as
            ``requested_compression``/``compression_note``).
        metadata: extra metadata (``optimizer``, ``base_model``, ``base_model_revision``, ...).
            ``captured_at`` (``time.time()`` when this call started, before the optimizer
            state is read) is added unless given.
        write: whether this process writes; default rank 0 (or the only process).
        tied_aliases: also store a tied parameter's moments under its other names (its
            weights are saved under each of them). Default: as the engine's Trainer save
            path does (:func:`~ota_trainer.capture.sources.saves_tied_aliases`: DeepSpeed
            ZeRO-1/2 yes, otherwise no).
        bias_correction: ``"record"`` (default): store the raw ``exp_avg_sq`` with ``beta2``
            and ``step`` so the merger can correct it; ``"apply"``: store
            ``exp_avg_sq / (1 - beta2**step)`` (``bias_corrected: true``; Adam-family only).

    Returns:
        The file written, or ``None`` on a process that does not write.

    Raises:
        ConfigError: unknown ``compression`` or ``bias_correction``, or ``"apply"`` for an
            optimizer without Adam's ``beta2`` and ``step``.
        CaptureError: no second moment in this optimizer, unsupported engine, or reading or
            writing failed (the cause is chained).

    Example:
        >>> save_optimizer_moments("out", model, trainer.optimizer, metadata={"base_model": "org/base"})
        PosixPath('out/ota/moments.safetensors')
    """
    captured_at = time.time()
    if compression not in COMPRESSIONS:
        raise ConfigError(f"unknown moments compression {compression!r}; choose one of {COMPRESSIONS}")
    if bias_correction not in BIAS_CORRECTION:
        raise ConfigError(f"unknown bias_correction {bias_correction!r}; choose one of {BIAS_CORRECTION}")
    rank, _ = _dist_rank_world()
    write = (rank == 0) if write is None else write
    info = inspect_optimizer(optimizer)
    params, frozen = named_trainable_parameters(model)
    if not params:
        raise CaptureError("the model has no trainable parameters: nothing to capture")
    engine = detect_engine(params)
    if engine == "local" and not write:
        return None  # every rank holds the full state (DDP): nothing to do off the writer
    # moments follow the weights through save_pretrained's conversion (fused MoE experts saved per expert)
    layout = SavedLayout(model, {**_frozen_shapes(model, frozen), **{p.name: p.shape for p in params}})
    stored = "rank1" if info.family == "adafactor" else compression
    if engine == "deepspeed":
        without_state: list[str] = []
    else:
        without_state = [p.name for p in params if state_of(info, p.param) is None]
    if without_state:
        logger.warning(
            "%d trainable parameter(s) have no optimizer state (never received a gradient), e.g. %s; "
            "they get no moments",
            len(without_state),
            without_state[:3],
        )
    converted = {p.name for p in params if layout.saved_names(p.name) != [p.name]}
    entries = layout.convert(iter_second_moments(params, info, engine, compression=stored, whole=converted))
    no_state = set(without_state)  # held names
    frozen, without_state = _saved(layout, frozen), _saved(layout, without_state)
    if not write:
        for _ in entries:  # keep the collectives in step with the writer
            pass
        return None
    meta = capture_metadata(
        info, engine, params, frozen, without_state, compression=compression, stored_compression=stored, extra=metadata
    )
    meta.setdefault("captured_at", captured_at)
    if tied_aliases is None:
        tied_aliases = saves_tied_aliases(params)
    names = _saved(layout, [n for p in params for n in (p.name, *(p.aliases if tied_aliases else ()))], skip=no_state)
    scale = 1.0
    if bias_correction == "apply":
        scale = bias_correction_scale(meta.get("beta2"), meta.get("step"), optimizer=info.class_name)
        meta["bias_corrected"] = True
    stream = _MomentStream(entries, names, aliases=tied_aliases, scale=scale)
    try:
        return save_moments(folder, stream, compression=stored, metadata=meta)
    except Exception as e:
        if engine != "local":
            try:  # finish the collectives so the other ranks are not left waiting
                for _ in entries:
                    pass
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        if isinstance(e, CaptureError):
            raise
        kind = "invalid second moments" if isinstance(e, OTAError) else type(e).__name__
        raise CaptureError(f"capturing second moments into {Path(folder)} failed ({kind}): {e}") from e
