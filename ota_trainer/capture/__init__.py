"""Capture stage: read Adam's second moments from the optimizer during fine-tuning (method.md §1).

* :class:`OTACallback` - the ``TrainerCallback`` for ``transformers.Trainer`` / TRL trainers;
* :func:`save_optimizer_moments` - the same without a Trainer (custom loops, FSDP2);
* :mod:`.tensors` - pure tensor functions (Adafactor conversion, bitsandbytes dequantization,
  sharded row/column sums); :mod:`.names` - parameter naming; :mod:`.sources` - reading
  state per optimizer family and engine.

>>> from ota_trainer.capture import OTACallback
>>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[OTACallback()])
"""

from __future__ import annotations

from .callback import MERGE_READY_TAG, OTACallback, align_moments_to_weights, check_moments_cover_weights
from .core import capture_metadata, save_optimizer_moments
from .names import NamedParameter, clean_parameter_name, named_trainable_parameters, trainable_weights
from .sources import (
    CapturedMoment,
    OptimizerInfo,
    detect_engine,
    inspect_optimizer,
    iter_second_moments,
    saves_tied_aliases,
)
from .tensors import (
    adafactor_rank1_factors,
    adafactor_second_moment,
    dequantize_bnb_state2,
    dtensor_rank1_factors,
    flat_fragment_rank1_partials,
)

__all__ = [
    "OTACallback",
    "MERGE_READY_TAG",
    "save_optimizer_moments",
    "capture_metadata",
    "check_moments_cover_weights",
    "align_moments_to_weights",
    "NamedParameter",
    "clean_parameter_name",
    "named_trainable_parameters",
    "trainable_weights",
    "CapturedMoment",
    "OptimizerInfo",
    "detect_engine",
    "inspect_optimizer",
    "iter_second_moments",
    "saves_tied_aliases",
    "adafactor_rank1_factors",
    "adafactor_second_moment",
    "dequantize_bnb_state2",
    "dtensor_rank1_factors",
    "flat_fragment_rank1_partials",
]
