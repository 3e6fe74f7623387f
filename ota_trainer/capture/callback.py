"""``OTACallback``: the Trainer glue of the capture stage (method.md §1)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import CaptureError, ConfigError, FormatError
from ..io.layout import ffg_histogram_path, remove_dead_leftovers
from ..moments.format import (
    COMPRESSIONS,
    FORMAT_VERSION_TAG,
    MANAGED_KEYS,
    MERGE_READY_TAG,
    has_moments,
    load_moments,
    moments_path,
    save_moments,
)
from .core import BIAS_CORRECTION, save_optimizer_moments
from .lora import ESTIMATORS, LoraCurvature, check_schedule, is_lora_model
from .names import named_trainable_parameters, trainable_weights
from .sources import detect_engine, inspect_optimizer, optimizer_hyperparameters

logger = logging.getLogger(__name__)

__all__ = ["OTACallback", "MERGE_READY_TAG", "align_moments_to_weights", "check_moments_cover_weights"]

_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR

STAGING_DIR = "_ota-staging"
"""Where a checkpoint's moments wait until the Trainer has saved the checkpoint:
``output_dir/_ota-staging/.checkpoint-N/ota/moments.safetensors``. Not named ``checkpoint-*``
(``get_last_checkpoint``, ``sort_checkpoints``/``rotate_checkpoints`` never see it); the leading
``_`` is in the ignore patterns of ``Trainer.push_to_hub`` and ``Trainer._push_from_checkpoint``
(``"_*"``), and the hidden step folder in those of ``ota_trainer.hub.push_expert`` (``"**/.*"``),
so a staging folder left by a killed run is never uploaded by them."""


def _first_local(candidates: list[tuple[str, str | None]]) -> Path:
    """The first (name or folder, revision) found locally (:func:`~ota_trainer.merger.ffg_shipped.resolve_base`).

    Raises:
        ValueError: none is."""
    from ..merger.ffg_shipped import resolve_base

    for name, revision in candidates:
        try:
            return resolve_base(name, revision)
        except (OSError, ValueError):
            continue
    found = ", ".join(str(n) for n, _ in candidates)
    raise ValueError(f"the base model is not on this machine ({found}; OTACallback(base_model=...))")


def _checkpoint_dir(args: Any, state: Any) -> Path:
    return Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{state.global_step}"


def _staging_root(args: Any) -> Path:
    return Path(args.output_dir) / STAGING_DIR


def _staging_dir(args: Any, state: Any) -> Path:
    return _staging_root(args) / f".{_CHECKPOINT_PREFIX}-{state.global_step}"


def _remove_staging(args: Any) -> None:
    root = _staging_root(args)
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)


def _is_writer(args: Any) -> bool:
    """Whether this process writes files: global rank 0 (local rank 0 of each node with
    ``save_on_each_node``). Read from torch.distributed when it is initialised, because
    ``args.should_save`` can be true on every rank (seen with DeepSpeed on CPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if getattr(args, "save_on_each_node", False):
            return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
        return dist.get_rank() == 0
    return bool(args.should_save)


def _copy_moments(src_folder: Path, dst_folder: Path) -> None:
    """Copy ``src/ota/moments.safetensors`` to ``dst/ota/`` atomically (tmp file + rename).

    Temporary files of earlier copies (or saves) into ``dst/ota/`` whose process died are removed first.
    """
    src, dst = moments_path(src_folder), moments_path(dst_folder)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(dst)
    tmp = dst.with_name(dst.name + f".tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def check_moments_cover_weights(folder: str | os.PathLike, frozen: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Problems between a saved checkpoint's weights and its moments (empty when they line up).

    Every floating weight in the saved safetensors that is not frozen must have moments, and
    the moments must name only saved weights (the merger rejects any other name).
    """
    from ..io.checkpoint import ModelFolder

    weights = ModelFolder(folder).tensors
    with load_moments(folder) as moments:
        problems = [f"moments for {n!r}, which the saved weights lack" for n in moments.shapes if n not in weights]
        frozen_set = set(frozen)
        problems += [
            f"no moments for saved trainable weight {n!r}"
            for n, t in weights.items()
            if n not in moments and n not in frozen_set and t.dtype.is_floating_point
        ]
    return problems


def align_moments_to_weights(folder: str | os.PathLike, tied: dict[str, str]) -> bool | None:
    """Make a checkpoint's moments use the names its saved weights use for tied parameters.

    Moments are written before the Trainer saves the weights, under the names its save path
    is expected to use (:func:`~ota_trainer.capture.sources.saves_tied_aliases`). If the
    saved weights turn out to carry a tied alias the moments lack (or lack the name the
    moments use), the moments file is rewritten with the names of the weights. Entries
    stored rank-one pass through ``outer(r, c) / sum(r)`` then (float32 rounding).

    Args:
        folder: a checkpoint holding weights and ``ota/moments.safetensors``.
        tied: ``{alias: name}`` of tied parameters (the metadata's ``tied_parameters``).

    Returns:
        Whether the saved weights hold tied aliases (``None`` when nothing is tied or there
        are no safetensors weights to compare with).
    """
    from ..io.checkpoint import ModelFolder
    from ..moments.format import save_moments

    if not tied:
        return None
    try:
        weights = set(ModelFolder(folder).tensors)
    except FormatError:
        return None
    with load_moments(folder) as reader:
        have = set(reader.shapes)
        tied_names = set(tied) | set(tied.values())
        # name to write -> name in the file; only tied names are touched
        source: dict[str, str] = {n: n for n in have if n in weights or n not in tied_names}
        for alias, name in tied.items():
            src = name if name in have else alias if alias in have else None
            for n in (name, alias):
                if src is not None and n in weights:
                    source.setdefault(n, src)
        saved_aliases = any(a in weights for a in tied)
        if set(source) == have:
            return saved_aliases
        logger.warning(
            "OTA: %s: renaming tied moments to match the saved weights (%s -> %s)",
            folder,
            sorted(have - set(source)),
            sorted(set(source) - have),
        )

        class _Renamed(dict):
            def items(self):  # one tensor at a time, as stored (rank-one sums stay exact)
                for n, src in source.items():
                    yield n, reader.raw(src)

        keep = {k: v for k, v in reader.metadata.items() if k not in MANAGED_KEYS}
        save_moments(folder, _Renamed(), compression=reader.metadata["compression"], metadata=keep)
        return saved_aliases


class OTACallback(TrainerCallback):
    """Save Adam's second moments beside every checkpoint, so the expert can be OTA-merged.

    Implements the capture stage of "Harnessing Optimization Dynamics for Curvature-Informed
    Model Merging" (Mahdavi et al., arXiv 2509.11167): at the end of fine-tuning, the
    optimizer's ``exp_avg_sq`` (``v_t`` in the paper, a diagonal-Fisher proxy) is read for
    every trainable parameter, keyed by the parameter's saved weight name, compressed to
    rank-one row/column sums (``r = v.sum(1)``, ``c = v.sum(0)``) or kept whole, and written
    to ``<folder>/ota/moments.safetensors`` (format v1, :mod:`ota_trainer.moments.format`).

    Works with ``transformers.Trainer`` and TRL's ``SFTTrainer``; never changes the
    ``TrainingArguments``. Optimizers: Adam/AdamW (``adamw_torch``, ``adamw_torch_fused``,
    other variants with ``exp_avg_sq``), ``adafactor`` (factored state, stored rank-one),
    bitsandbytes 8-bit/32-bit AdamW (``state2`` dequantized). Optimizers without a second
    moment (SGD...) raise :class:`~ota_trainer.errors.CaptureError` in ``on_train_begin``,
    before any compute. Engines: single process, DDP (rank 0 writes), DeepSpeed ZeRO 1/2/3
    and FSDP2 (collective reads on every rank, rank 0 writes).

    When files are written (``N`` = ``state.global_step``), and why this puts the moments
    into the same Hub commit as the weights:

    1. ``on_step_end`` / ``on_epoch_end`` with ``control.should_save`` set (the Trainer is
       about to save ``checkpoint-N``): the optimizer state is read BEFORE the Trainer
       writes the weights, and the moments are staged in
       ``output_dir/_ota-staging/.checkpoint-N/ota/`` (:data:`STAGING_DIR`), a place the
       Trainer's checkpoint discovery (``get_last_checkpoint``, checkpoint rotation) and its
       uploads of ``output_dir`` (ignore pattern ``"_*"``) never look at. So a run killed
       before the Trainer has saved ``checkpoint-N`` leaves no half-made ``checkpoint-N/``
       and resumes from the previous checkpoint.
    2. ``on_push_begin`` (``Trainer._push_from_checkpoint``, called after the checkpoint is
       saved and immediately before the Trainer copies the checkpoint's weights into
       ``output_dir`` and uploads ``output_dir`` in one ``upload_folder`` commit): the staged
       moments are moved into ``checkpoint-N/ota/`` (``os.replace``, atomic) and copied to
       ``output_dir/ota/``, so that commit holds the weights and moments of step ``N``; with
       ``hub_strategy="checkpoint"`` or ``"all_checkpoints"`` the checkpoint folder, uploaded
       next, holds them too. (Copying into ``output_dir`` here, not earlier, keeps it
       untouched while a previous upload may still be reading it: the Trainer skips a push
       while one is in progress unless ``hub_always_push``.)
    3. ``on_save`` (after ``checkpoint-N`` is saved; first when there is no push): the staged
       moments are moved into ``checkpoint-N/ota/`` if still staged; if the step was not
       captured yet (``save_strategy="best"``, where the save decision comes after
       evaluation), it is captured now (staged, then moved at once); the checkpoint's
       weights and moments are then checked to line up.
    4. ``on_train_end``: moments of the final optimizer state go to ``output_dir/ota/``
       (with ``load_best_model_at_end``, the best checkpoint's moments are copied instead).
       ``trainer.save_model()`` / ``trainer.push_to_hub()`` after ``train()`` then save and
       upload ``output_dir`` with the weights in one commit.

    Names: moments are keyed by the names the weights are saved under. Tied weights have one
    optimizer state; it is stored under the one name ``save_pretrained`` keeps, or under
    every alias when the save path writes them all (DeepSpeed ZeRO-1/2 saves a state dict of
    clones). Before each upload (``on_push_begin``) and in ``on_save`` the checkpoint's
    moments are aligned with the names actually saved (rewritten if they differ, and the
    choice is kept for later captures).

    Which weights the moments belong to (metadata, for the merger's checks): ``global_step``
    (the Trainer step whose optimizer state was read, i.e. of the weights they belong to),
    ``captured_at`` (``time.time()`` when that state was read; the final capture of a step
    already captured for its checkpoint reuses that time, so both files are identical),
    ``written_before_weights`` (``true`` when the state was read before the Trainer wrote
    those weights: cases 1 and 4; ``false`` for the captures of case 2/3 made after the
    checkpoint was saved, whose weight files are older by design), and
    ``load_best_model_at_end`` (the run's setting: the moments of the best checkpoint may end
    up in ``output_dir`` beside a final ``trainer_state.json`` whose ``global_step`` is the
    last step and whose ``best_global_step`` is theirs). Rewrites (tied-name alignment,
    ``convert_moments``) and copies keep these keys.

    ``on_train_begin`` removes a stale ``output_dir/ota/moments.safetensors`` and the staging
    folder left by an earlier run (writer rank only), and adds the
    ``ota-merge-ready`` and ``ota-moments-v1`` (format version) tags to the model
    (``model.add_model_tags``), which ``Trainer.push_to_hub`` writes into the model card's
    ``tags`` (the Trainer rebuilds the card after the callbacks run, so a tag is the card
    metadata that survives; :func:`~ota_trainer.hub.push_expert` also sets
    ``ota_moments_format_version``). Moments an earlier run left in a ``checkpoint-N/``
    this run is about to overwrite are removed before the Trainer writes the new weights
    there (they would sit beside them until this run's moments are moved in).

    Never losing training: a failed capture at a checkpoint is raised in ``on_save``,
    after the checkpoint is on disk (resume from it). A failed capture at the end saves the
    model to ``output_dir`` first (``save_pretrained``, single process or DDP), then raises.

    Args:
        compression: ``"rank1"`` (row/column sums, ~99% smaller; the default) or ``"full"``.
        save_on_checkpoint: also write moments into every ``checkpoint-N/`` folder (and so
            into mid-training Hub pushes), making every checkpoint merge-ready.
        base_model: base model id recorded in the metadata; default ``model.config._name_or_path``
            (or ``model.name_or_path``) when it is not a local folder.
        base_model_revision: base model revision recorded in the metadata; default the
            config's ``_commit_hash`` when the base came from the Hub.
        tag_model_card: add the ``ota-merge-ready`` tag to the model's tags.
        bias_correction: ``"record"`` (store raw ``exp_avg_sq`` with ``beta2`` and ``step``;
            the merger corrects it) or ``"apply"`` (store ``exp_avg_sq / (1 - beta2**step)``,
            ``bias_corrected: true``; Adam-family optimizers only).
        lora_estimator: on a PEFT LoRA model, how the frozen weights' curvature is estimated:
            ``"exact"`` (the full-weight gradient per adapted layer) or ``"factored"`` (K-FAC-style
            row and column factors, cheaper); see :mod:`ota_trainer.capture.lora`.
        lora_every: LoRA: capture one optimizer step in this many (1: every step); the steps
            between take the captured step's squared gradient with Adam's weights.
        lora_window: LoRA: capture only the run's last this many steps (None: the whole run);
            the stored factors are scaled so that the merger's bias correction is the window's.
        ship_ffg_histogram: at the end of training, also write the expert's FFG saliency histogram
            to ``output_dir/ota/ffg_histogram.safetensors`` (counted from the weights in memory
            against the base's files and the moments just written; ``save_model`` /
            ``push_to_hub`` then save and upload it with them), so a first merge of the expert
            skips FFG's histogram pass (:mod:`ota_trainer.merger.ffg_shipped`; the merge proves
            it, so it can cost time, never bytes). Only where the full weights are in this
            process (single process, DDP; not ZeRO/FSDP2, not LoRA adapters) and the base is a
            local folder or in the Hugging Face cache; otherwise it is skipped with a log line.

    Bias correction is recorded by default, not applied: files hold the raw ``exp_avg_sq``
    with ``bias_corrected: false``, ``beta2`` and ``step``; the merger divides by
    ``1 - beta2**step`` (its ``bias_correction`` parameter, on by default).

    Example:
        >>> from trl import SFTConfig, SFTTrainer
        >>> from ota_trainer.capture import OTACallback
        >>> trainer = SFTTrainer(model=model, args=SFTConfig("out/math"), train_dataset=ds,
        ...                      callbacks=[OTACallback(compression="rank1")])
        >>> trainer.train()
        >>> trainer.save_model()  # out/math/{model.safetensors, ota/moments.safetensors}
    """

    def __init__(
        self,
        compression: str = "rank1",
        *,
        save_on_checkpoint: bool = True,
        base_model: str | None = None,
        base_model_revision: str | None = None,
        tag_model_card: bool = True,
        bias_correction: str = "record",
        lora_estimator: str = "exact",
        lora_every: int = 1,
        lora_window: int | None = None,
        ship_ffg_histogram: bool = True,
    ):
        if compression not in COMPRESSIONS:
            raise ConfigError(f"OTACallback(compression={compression!r}): choose one of {COMPRESSIONS}")
        if bias_correction not in BIAS_CORRECTION:
            raise ConfigError(f"OTACallback(bias_correction={bias_correction!r}): choose one of {BIAS_CORRECTION}")
        if lora_estimator not in ESTIMATORS:
            raise ConfigError(f"OTACallback(lora_estimator={lora_estimator!r}): choose one of {ESTIMATORS}")
        check_schedule(lora_every, lora_window)  # (against the run's length when it starts)
        self.lora_estimator = lora_estimator
        self.lora_every, self.lora_window = lora_every, lora_window
        self._lora: LoraCurvature | None = None  # a PEFT LoRA model: the frozen weights' curvature
        self.bias_correction = bias_correction
        self.compression = compression
        self.save_on_checkpoint = save_on_checkpoint
        self.base_model = base_model
        self.base_model_revision = base_model_revision
        self.tag_model_card = tag_model_card
        self.ship_ffg_histogram = ship_ffg_histogram
        self._training = False
        self._verified = False
        self._engine: str | None = None
        self._frozen: list[str] = []
        self._tied: dict[str, str] = {}
        self._tied_aliases: bool | None = None  # learned from the first saved checkpoint
        self._captured_steps: set[int] = set()
        self._captured_at: dict[int, tuple[float, bool]] = {}  # step -> (captured_at, written_before_weights)
        self._start_step = 0  # global_step at on_train_begin (the resumed checkpoint's step)
        self._pending_error: CaptureError | None = None

    # -- helpers --------------------------------------------------------------------------
    def _resolve_base_model(self, model: Any) -> tuple[str | None, str | None]:
        if self.base_model is not None:
            return self.base_model, self.base_model_revision
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
        if not name or os.path.isdir(str(name)):
            return (str(name) if name else None), self.base_model_revision
        return str(name), self.base_model_revision or getattr(config, "_commit_hash", None)

    def _metadata(
        self, args: Any, state: Any, model: Any, *, captured_at: float, written_before_weights: bool
    ) -> dict[str, Any]:
        base_model, base_revision = self._resolve_base_model(model)
        return {
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "base_model": base_model,
            "base_model_revision": base_revision,
            "global_step": int(state.global_step),
            "epoch": state.epoch,
            "captured_at": captured_at,
            "written_before_weights": written_before_weights,
            "load_best_model_at_end": bool(getattr(args, "load_best_model_at_end", False)),
            "training": {
                "learning_rate": args.learning_rate,
                "weight_decay": args.weight_decay,
                "max_grad_norm": args.max_grad_norm,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "world_size": args.world_size,
                "seed": args.seed,
                "hub_model_id": args.hub_model_id,
            },
        }

    def _capture(
        self,
        folder: Path,
        args: Any,
        state: Any,
        model: Any,
        optimizer: Any,
        *,
        written_before_weights: bool,
        captured_at: float | None = None,
    ) -> Path | None:
        captured_at = time.time() if captured_at is None else captured_at
        if self._lora is not None:  # LoRA: the adapted weights' curvature, keyed by the base weights' names
            meta = self._metadata(
                args, state, model, captured_at=captured_at, written_before_weights=written_before_weights
            )
            meta.update(self._lora.metadata(model))
            path = (
                save_moments(folder, self._lora.factors(), compression="rank1", metadata=meta)
                if _is_writer(args)
                else None
            )
            if path is not None:
                logger.info(
                    "OTA: LoRA curvature (%s) of step %d written to %s", self._lora.estimator, state.global_step, path
                )
            return path
        path = save_optimizer_moments(
            folder,
            model,
            optimizer,
            compression=self.compression,
            metadata=self._metadata(
                args, state, model, captured_at=captured_at, written_before_weights=written_before_weights
            ),
            write=_is_writer(args),
            tied_aliases=self._tied_aliases,
            bias_correction=self.bias_correction,
        )
        if path is not None:
            logger.info("OTA: second moments of step %d written to %s", state.global_step, path)
        return path

    def _capture_checkpoint(self, args: Any, state: Any, model: Any, optimizer: Any, *, saved: bool) -> None:
        """Capture step N into the staging folder (once per step; collective under ZeRO/FSDP2).

        ``saved``: the Trainer has already written ``checkpoint-N`` (``save_strategy="best"``):
        the moments are written after their weights (the caller moves them in right away).
        """
        step = int(state.global_step)
        if step in self._captured_steps:
            return
        if self._lora is not None and not self._lora.captured:
            logger.info(
                "OTA: checkpoint-%d saved without LoRA curvature: no step captured yet (%s)",
                step,
                self._lora.describe(),
            )
            return
        self._captured_steps.add(step)
        captured_at, before = time.time(), not saved
        self._captured_at[step] = (captured_at, before)
        try:
            self._capture(
                _staging_dir(args, state),
                args,
                state,
                model,
                optimizer,
                written_before_weights=before,
                captured_at=captured_at,
            )
        except CaptureError as e:
            # Raised in on_save, once the Trainer has written the checkpoint itself.
            logger.error("OTA: capturing second moments for checkpoint-%d failed: %s", step, e)
            self._pending_error = e

    @staticmethod
    def _publish(args: Any, state: Any) -> bool:
        """Move the staged moments of step N into ``checkpoint-N/ota/`` once the Trainer has saved it."""
        staged, ckpt = moments_path(_staging_dir(args, state)), _checkpoint_dir(args, state)
        if not staged.is_file() or not ckpt.is_dir():
            return False
        dst = moments_path(ckpt)
        dst.parent.mkdir(exist_ok=True)
        try:
            os.replace(staged, dst)
        except FileNotFoundError:  # moved by another writer of the same folder (save_on_each_node)
            return False
        for empty in (staged.parent, staged.parent.parent, _staging_root(args)):
            try:
                empty.rmdir()
            except OSError:  # not empty (another step staged) or already gone
                break
        logger.debug("OTA: moments of step %d moved into %s", state.global_step, dst)
        return True

    def _drop_stale_checkpoint_moments(self, args: Any, state: Any) -> None:
        """Before the Trainer (maybe) saves ``checkpoint-N``: moments already there come from an
        earlier run (this run has not saved step N yet); the new weights must not sit beside them."""
        step = int(state.global_step)
        if step <= self._start_step or step in self._captured_steps or not _is_writer(args):
            return
        stale = moments_path(_checkpoint_dir(args, state))
        if stale.is_file():
            logger.warning(
                "OTA: removing %s left by an earlier run (the Trainer is about to overwrite checkpoint-%d)", stale, step
            )
            stale.unlink(missing_ok=True)

    def _before_save(self, args: Any, state: Any, control: Any, model: Any, optimizer: Any) -> None:
        """``on_step_end`` / ``on_epoch_end``: the Trainer saves ``checkpoint-N`` next if ``should_save``
        (or, with ``save_strategy="best"``, after evaluating if the metric improved)."""
        best = str(getattr(args.save_strategy, "value", args.save_strategy)) == "best"
        if control.should_save or (best and control.should_evaluate):
            self._drop_stale_checkpoint_moments(args, state)
        if self.save_on_checkpoint and control.should_save:
            self._capture_checkpoint(args, state, model, optimizer, saved=False)

    # -- events ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Refuse optimizers without a second moment; tag the model; drop stale moments."""
        if optimizer is None or model is None:
            raise CaptureError("OTACallback needs the Trainer's model and optimizer (got None)")
        info = inspect_optimizer(optimizer)
        if self.bias_correction == "apply" and optimizer_hyperparameters(info).get("beta2") is None:
            raise ConfigError(
                f"OTACallback(bias_correction='apply') needs Adam's beta2; {info.class_name} has none "
                "(Adafactor's average is unbiased by construction). Use bias_correction='record'"
            )
        params, self._frozen = named_trainable_parameters(model)
        self._tied = {alias: p.name for p in params for alias in p.aliases}
        if not params:
            raise CaptureError("the model has no trainable parameters: nothing for OTACallback to capture")
        self._engine = detect_engine(params)
        self._verified = info.verified
        if info.family == "adafactor" and self.compression == "full":
            logger.warning(
                "OTA: Adafactor keeps only row/column statistics for matrices; compression='full' stores them "
                "as rank-one sums (1-D tensors stay full)"
            )
        if self.tag_model_card and hasattr(model, "add_model_tags"):
            model.add_model_tags([MERGE_READY_TAG, FORMAT_VERSION_TAG])
        for stale in (moments_path(args.output_dir), ffg_histogram_path(args.output_dir)):
            if _is_writer(args) and stale.is_file():
                logger.warning("OTA: removing %s left by an earlier run (this run writes its own)", stale)
                stale.unlink()
        if _is_writer(args) and _staging_root(args).exists():
            logger.warning("OTA: removing %s left by an interrupted run", _staging_root(args))
            _remove_staging(args)
        if self._lora is not None:
            self._lora.remove()
            self._lora = None
        if is_lora_model(model):
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            beta2 = optimizer_hyperparameters(info).get("beta2")  # what the metadata records too
            if beta2 is None:
                raise CaptureError(
                    "LoRA curvature capture needs an Adam-family optimizer (betas in its parameter groups)"
                )
            self._lora = LoraCurvature(
                model,
                beta2,
                estimator=self.lora_estimator,
                accumulate=args.gradient_accumulation_steps > 1 or world > 1,
                every=self.lora_every,
                window=self.lora_window,
                total_steps=state.max_steps - state.global_step,  # the steps this run makes (resumed: the rest)
            )
            logger.info(
                "OTA: LoRA run: estimating the curvature of %d adapted weights (%s, %s)",
                len(self._lora.layers),
                self.lora_estimator,
                self._lora.describe(),
            )
        self._start_step = int(state.global_step)
        self._captured_steps.clear()
        self._captured_at.clear()
        self._pending_error = None
        self._training = True
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """LoRA: fold this step's squared full-weight gradient into the curvature estimate."""
        if self._lora is not None:
            self._lora.step()
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Before the Trainer saves ``checkpoint-N``: read its moments and stage them."""
        if not self._verified:
            info = inspect_optimizer(optimizer)  # raises CaptureError when the state has no second moment
            self._verified = info.verified
        self._before_save(args, state, control, model, optimizer)
        return control

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Same as ``on_step_end`` for ``save_strategy="epoch"`` (the save decision is made here)."""
        self._before_save(args, state, control, model, optimizer)
        return control

    def on_push_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Just before a mid-training upload (``checkpoint-N`` is saved): move its moments in and copy
        them to ``output_dir``."""
        if not self._training or not self.save_on_checkpoint:
            return control
        step = int(state.global_step)
        if step not in self._captured_steps and self._engine == "local":
            self._capture_checkpoint(args, state, model, optimizer, saved=True)  # save_strategy="best"
        if not _is_writer(args):
            return control
        self._publish(args, state)
        ckpt = _checkpoint_dir(args, state)
        if step in self._captured_steps and has_moments(ckpt):
            self._align(ckpt)
            _copy_moments(ckpt, Path(args.output_dir))
        return control

    def _align(self, ckpt: Path) -> None:
        saved_aliases = align_moments_to_weights(ckpt, self._tied)
        if saved_aliases is not None:
            self._tied_aliases = saved_aliases

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        """After ``checkpoint-N`` is saved: move staged moments in (capture if still missing), raise a
        pending error, check names."""
        if self.save_on_checkpoint:
            self._capture_checkpoint(args, state, model, optimizer, saved=True)
            if _is_writer(args):
                self._publish(args, state)
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise CaptureError(
                f"{err} (checkpoint {_checkpoint_dir(args, state)} was saved without moments; "
                "fix the cause and resume from it)"
            ) from err
        ckpt = _checkpoint_dir(args, state)
        # (a LoRA checkpoint holds an adapter, whose moments name the base weights: the merger checks them)
        if self.save_on_checkpoint and _is_writer(args) and has_moments(ckpt) and self._lora is None:
            self._align(ckpt)
            try:
                problems = check_moments_cover_weights(ckpt, self._frozen)
            except FormatError as e:  # e.g. ZeRO-3 without gathered 16-bit weights: no safetensors to compare
                logger.debug("OTA: could not compare moments and weights in %s: %s", ckpt, e)
                problems = []
            for p in problems[:10]:
                logger.warning("OTA: %s: %s", ckpt, p)
        return control

    def on_train_end(self, args, state, control, model=None, optimizer=None, processing_class=None, **kwargs):
        """Write the final moments to ``output_dir/ota/`` (before ``save_model`` / ``push_to_hub``)."""
        self._training = False
        if _is_writer(args):
            _remove_staging(args)  # moments of a step whose save another callback cancelled
        out = Path(args.output_dir)
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and has_moments(best):
            if _is_writer(args):
                _copy_moments(Path(best), out)
                logger.info("OTA: best checkpoint %s loaded at end; its moments copied to %s", best, out)
                self._ship_histogram(out, model)
            return control
        # The optimizer state of the last step was already captured for its checkpoint: that
        # capture's time and flag are reused, so output_dir/ota/ gets the same bytes as
        # checkpoint-N/ota/ (an upload of output_dir started at that checkpoint may still be
        # reading the file this replaces).
        captured_at, before = self._captured_at.get(int(state.global_step), (None, True))
        try:
            self._capture(out, args, state, model, optimizer, written_before_weights=before, captured_at=captured_at)
        except CaptureError as e:
            saved = self._save_model_after_failure(args, model, processing_class)
            where = (
                f"the trained model was saved to {out}"
                if saved
                else (
                    "the model could not be saved by OTACallback (sharded engine); call trainer.save_model() "
                    f"or resume from the last checkpoint in {out}"
                )
            )
            raise CaptureError(f"capturing second moments at the end of training failed; {where}. Cause: {e}") from e
        if self._lora is not None:
            self._lora.remove()  # the hooks go with the run
        elif _is_writer(args):
            self._ship_histogram(out, model)
        return control

    def _ship_histogram(self, out: Path, model: Any) -> None:
        """``ship_ffg_histogram``: the expert's FFG histogram beside its moments in ``out``, from the
        weights in memory. Never fails the run: a histogram only saves a merge time."""
        if not self.ship_ffg_histogram or self._lora is not None or not has_moments(out):
            return
        if self._engine != "local":
            logger.info(
                "OTA: no FFG histogram shipped under %s (call ota_trainer.save_ffg_histogram after saving)",
                self._engine,
            )
            return
        from ..errors import OTAError
        from ..merger.ffg_shipped import WeightsHeldElsewhere, ship_histogram_of_weights

        config = getattr(model, "config", None)
        loaded = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        candidates = [(self.base_model, self.base_model_revision), (loaded, getattr(config, "_commit_hash", None))]
        candidates = [(n, r) for n, r in candidates if n]  # the base named for the merger first
        if not candidates:  # a model built from a config: no base to count against
            logger.info("OTA: no FFG histogram shipped: the model names no base (OTACallback(base_model=...))")
            return
        try:
            ship_histogram_of_weights(out, _first_local(candidates), trainable_weights(model))
        except WeightsHeldElsewhere as e:  # e.g. MoE experts fused in memory, saved per expert (capture/conversion.py)
            logger.info(
                "OTA: no FFG histogram shipped: %s is saved in another layout than the model holds it; "
                "ota_trainer.save_ffg_histogram(output_dir, base) after save_model() counts it from the files",
                e.name,
            )
        except (OTAError, OSError, ValueError, RuntimeError) as e:
            logger.warning("OTA: no FFG histogram shipped with %s (merges count it themselves): %s", out, e)

    def _save_model_after_failure(self, args: Any, model: Any, processing_class: Any) -> bool:
        if self._engine != "local" or not hasattr(model, "save_pretrained"):
            return False
        if not _is_writer(args):
            return True
        try:
            model.save_pretrained(args.output_dir)
            if processing_class is not None:
                processing_class.save_pretrained(args.output_dir)
        except (OSError, RuntimeError, ValueError) as e:
            logger.error("OTA: saving the model after a failed capture failed too: %s", e)
            return False
        return True
