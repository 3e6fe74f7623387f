"""Reading second moments out of a live optimizer, for each optimizer family and engine.

Families (how the optimizer stores its second moment):

* ``adam``: ``state[p]["exp_avg_sq"]`` in the parameter's shape (torch ``Adam``/``AdamW``
  incl. fused and foreach, ``NAdam``, ``RAdam``, DeepSpeed ``FusedAdam``/``DeepSpeedCPUAdam``
  under ZeRO, other AdamW variants that keep ``exp_avg_sq``);
* ``adafactor``: transformers ``Adafactor``, factored ``exp_avg_sq_row``/``exp_avg_sq_col``
  (means, see :func:`~ota_trainer.capture.tensors.adafactor_rank1_factors`) for 2+-dim
  tensors, full ``exp_avg_sq`` for 1-D ones;
* ``bnb``: bitsandbytes 2-state optimizers (``AdamW8bit``, ``PagedAdamW``, ...), quantized
  ``state2`` (see :func:`~ota_trainer.capture.tensors.dequantize_bnb_state2`).

Engines (where the state lives):

* ``local``: one process, or DDP (every rank holds the full, identical state);
* ``fsdp2``: ``fully_shard`` models, parameters and states are ``DTensor`` s sharded on dim 0;
* ``deepspeed``: ZeRO stage 1, 2 or 3, state partitioned in flat fp32 buffers.

Under ``fsdp2`` and ``deepspeed`` reading is COLLECTIVE: every rank must iterate
:func:`iter_second_moments` to the end, in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CaptureError
from .names import NamedParameter
from .tensors import (
    adafactor_rank1_factors,
    dequantize_bnb_state2,
    dtensor_rank1_factors,
    flat_fragment_rank1_partials,
    to_cpu_float32,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINES",
    "FAMILIES",
    "CapturedMoment",
    "OptimizerInfo",
    "detect_engine",
    "inspect_optimizer",
    "iter_second_moments",
    "optimizer_hyperparameters",
    "saves_tied_aliases",
    "unwrap_optimizer",
]

FAMILIES = ("adam", "adafactor", "bnb")
ENGINES = ("local", "fsdp2", "deepspeed")

# Class names (anywhere in the MRO) of optimizers with an Adam-style ``exp_avg_sq``.
_ADAM_CLASSES = {
    "Adam",
    "AdamW",
    "NAdam",
    "RAdam",
    "SparseAdam",
    "FusedAdam",
    "FusedAdamW",
    "DeepSpeedCPUAdam",
    "AnyPrecisionAdamW",
    "AdamWScheduleFree",
    "StableAdamW",
}
# Optimizers known to keep no Adam second moment: refused before any compute.
_NO_SECOND_MOMENT = {
    "SGD": "momentum only",
    "Adagrad": "a running SUM of squared gradients, not an average",
    "Adadelta": "no Adam second moment",
    "Adamax": "an infinity norm (exp_inf), not exp_avg_sq",
    "RMSprop": "square_avg, not Adam's exp_avg_sq",
    "Rprop": "no second moment",
    "ASGD": "no second moment",
    "LBFGS": "no second moment",
    "Lion": "one momentum state only",
    "Optimizer1State": "one state only",
    "Muon": "no second moment for matrices",
    "LayerWiseDummyOptimizer": "per-layer optimizers hidden from the Trainer",
}
# Wrappers whose real optimizer is ``.optimizer`` (accelerate).
_WRAPPERS = {"AcceleratedOptimizer", "DeepSpeedOptimizerWrapper", "FSDP2OptimizerWrapper"}
# DeepSpeed optimizers that partition state over ranks (the base optimizer is ``.optimizer``).
_ZERO_CLASSES = {"DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"}


def _mro_names(obj: Any) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds the state: accelerate's ``AcceleratedOptimizer`` (what the
    Trainer hands callbacks) and its DeepSpeed/FSDP variants are peeled off via ``.optimizer``."""
    seen = 0
    while type(optimizer).__name__ in _WRAPPERS and getattr(optimizer, "optimizer", None) is not None and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


@dataclass(frozen=True)
class OptimizerInfo:
    """What :func:`inspect_optimizer` found.

    Attributes:
        family: ``"adam"``, ``"adafactor"`` or ``"bnb"``.
        optimizer: the unwrapped optimizer (for DeepSpeed, the ZeRO optimizer).
        base: the optimizer holding ``param_groups`` and ``state`` (for ZeRO, ``optimizer.optimizer``).
        class_name: ``type(base).__name__``, recorded in the metadata.
        verified: whether the state was seen to hold the expected keys (false before the first step).
    """

    family: str
    optimizer: Any
    base: Any
    class_name: str
    verified: bool = False


def _family_from_state(state: dict) -> str | None:
    if "exp_avg_sq_row" in state or ("exp_avg_sq" in state and "RMS" in state):
        return "adafactor"
    if "exp_avg_sq" in state:
        return "adam"
    if "state2" in state:
        return "bnb"
    return None


def inspect_optimizer(optimizer: Any) -> OptimizerInfo:
    """Classify an optimizer by where it keeps its second moment; refuse those without one.

    Works before the first step (from the class) and checks the state when there is some
    (resumed runs, later calls).

    Raises:
        CaptureError: the optimizer keeps no Adam-style second moment (SGD, Adagrad, Lion...),
            or is of an unknown kind with no ``betas`` and no state to look at.
    """
    opt = unwrap_optimizer(optimizer)
    base = opt.optimizer if type(opt).__name__ in _ZERO_CLASSES else opt
    names = _mro_names(base)
    cls = type(base).__name__
    for n in names:
        if n in _NO_SECOND_MOMENT:
            raise CaptureError(
                f"optimizer {cls} keeps {_NO_SECOND_MOMENT[n]}: there is no Adam second moment to capture. "
                "Train with an Adam-family optimizer (TrainingArguments(optim='adamw_torch_fused'), 'adamw_torch', "
                "'adafactor', 'adamw_bnb_8bit'), or remove OTACallback"
            )
    state = getattr(base, "state", None) or {}
    seen = next((s for s in state.values() if isinstance(s, dict) and s), None)
    family = _family_from_state(seen) if seen is not None else None
    if seen is not None and family is None:
        raise CaptureError(
            f"optimizer {cls} state holds {sorted(seen)}, none of which is a second moment "
            "(expected exp_avg_sq, exp_avg_sq_row/col or state2)"
        )
    if family is None:
        if "Adafactor" in names:
            family = "adafactor"
        elif "Optimizer2State" in names:
            family = "bnb"
        elif any(n in _ADAM_CLASSES for n in names) or all("betas" in g for g in getattr(base, "param_groups", [{}])):
            family = "adam"
        else:
            raise CaptureError(
                f"optimizer {cls} is not an Adam-family optimizer ota_trainer knows and has no 'betas': "
                "cannot tell where its second moment is. Use an Adam-family optimizer"
            )
        if not any(n in _ADAM_CLASSES or n in ("Adafactor", "Optimizer2State") for n in names):
            logger.warning(
                "optimizer %s is not one ota_trainer knows; assuming Adam-style 'exp_avg_sq' state "
                "(checked after the first step)",
                cls,
            )
    return OptimizerInfo(family=family, optimizer=opt, base=base, class_name=cls, verified=seen is not None)


def saves_tied_aliases(params: list[NamedParameter]) -> bool:
    """Whether the Trainer's save path writes tied weights under every alias.

    ``save_pretrained`` drops tie targets only when the state dict's tensors share storage.
    DeepSpeed ZeRO-1/2 saves a state dict of clones (``clone_tensors_for_torch_save``), so
    ``lm_head.weight`` is written next to ``model.embed_tokens.weight``; single process,
    DDP and ZeRO-3 (consolidated state dict keeps shared tensors shared) write one name.
    """
    return any(hasattr(p.param, "_hp_mapping") and not hasattr(p.param, "ds_id") for p in params)


def detect_engine(params: list[NamedParameter]) -> str:
    """``"deepspeed"`` (ZeRO-partitioned parameters), ``"fsdp2"`` (``DTensor`` parameters) or ``"local"``.

    Raises:
        CaptureError: FSDP1 flat parameters (unsupported: use FSDP2).
    """
    from torch.distributed.tensor import DTensor

    for np_ in params:
        p = np_.param
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            return "deepspeed"
        if isinstance(p, DTensor):
            return "fsdp2"
        if getattr(p, "_is_flat_param", False) or "_fsdp_wrapped_module" in np_.name:
            raise CaptureError(
                "FSDP1 (FullyShardedDataParallel) is not supported by OTACallback: its parameters are flat "
                "shards. Use FSDP2 (fsdp_config={'fsdp_version': 2}) or DeepSpeed ZeRO"
            )
    return "local"


def optimizer_hyperparameters(info: OptimizerInfo) -> dict[str, Any]:
    """``beta2``, ``betas``, ``eps``, ``step`` (and Adafactor's ``decay_rate``) for the metadata.

    ``step`` is the largest per-parameter step in the state (read from the flat state under
    DeepSpeed: its per-parameter accessor deadlocks on ``"step"``). ``beta2`` is ``None`` for
    Adafactor, whose ``beta2_t = 1 - t**decay_rate`` varies with the step (and makes its
    average unbiased by construction).
    """
    groups = list(getattr(info.base, "param_groups", []) or [])
    out: dict[str, Any] = {"beta2": None}
    if info.family == "adafactor":
        out["decay_rate"] = groups[0].get("decay_rate") if groups else None
    else:
        betas = [tuple(float(b) for b in g["betas"]) for g in groups if "betas" in g]
        if betas:
            out["betas"] = list(betas[0])
            out["beta2"] = betas[0][1]
            if len(set(b[1] for b in betas)) > 1:
                out["beta2_per_group"] = [b[1] for b in betas]
                logger.warning(
                    "parameter groups use different beta2 %s; metadata records the first", out["beta2_per_group"]
                )
        if groups and "eps" in groups[0]:
            out["eps"] = (
                float(groups[0]["eps"]) if not isinstance(groups[0]["eps"], (tuple, list)) else list(groups[0]["eps"])
            )
    steps = []
    for s in (getattr(info.base, "state", None) or {}).values():
        if isinstance(s, dict) and "step" in s:
            st = s["step"]
            steps.append(int(st.item()) if torch.is_tensor(st) else int(st))
    out["step"] = max(steps) if steps else None
    return out


@dataclass
class CapturedMoment:
    """One parameter's second moment as read: the full tensor, or its rank-one sums.

    Attributes:
        name: saved weight name.
        shape: the parameter's shape.
        full: ``v`` (float32, CPU) when it was read whole.
        factors: ``(r, c)`` row and column sums when only those were read.
        aliases: other names of the same (tied) parameter.
    """

    name: str
    shape: tuple[int, ...]
    full: torch.Tensor | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    aliases: tuple[str, ...] = ()


def state_of(info: OptimizerInfo, p: torch.nn.Parameter) -> dict | None:
    state = info.base.state.get(p) if hasattr(info.base.state, "get") else None
    return state or None


def _check_shape(name: str, v: torch.Tensor, shape: tuple[int, ...], cls: str) -> None:
    if tuple(v.shape) != tuple(shape):
        raise CaptureError(
            f"second moment of {name!r} has shape {tuple(v.shape)}, the parameter {tuple(shape)}: optimizer {cls} "
            "keeps a projected or reshaped state (GaLore-style?), which cannot be merged element-wise"
        )


def _read_local(info: OptimizerInfo, np_: NamedParameter) -> CapturedMoment | None:
    state = state_of(info, np_.param)
    if state is None:
        return None
    shape = np_.shape
    if info.family == "adafactor" and "exp_avg_sq_row" in state:
        r, c = adafactor_rank1_factors(state["exp_avg_sq_row"], state["exp_avg_sq_col"], shape)
        return CapturedMoment(np_.name, shape, factors=(r, c))
    if info.family == "bnb" or ("state2" in state and "exp_avg_sq" not in state):
        return CapturedMoment(np_.name, shape, full=dequantize_bnb_state2(state, shape))
    if "exp_avg_sq" not in state:
        raise CaptureError(
            f"optimizer {info.class_name} state for {np_.name!r} has keys {sorted(state)}, no 'exp_avg_sq'"
        )
    v = state["exp_avg_sq"]
    _check_shape(np_.name, v, shape, info.class_name)
    return CapturedMoment(np_.name, shape, full=to_cpu_float32(v))


def _read_fsdp2(info: OptimizerInfo, np_: NamedParameter, compression: str) -> CapturedMoment | None:
    from torch.distributed.tensor import DTensor

    state = state_of(info, np_.param)
    if state is None:
        return None
    if "exp_avg_sq" not in state:
        raise CaptureError(
            f"FSDP2 capture supports Adam-style 'exp_avg_sq' states only; {info.class_name} keeps {sorted(state)}"
        )
    v = state["exp_avg_sq"]
    shape = np_.shape
    _check_shape(np_.name, v, shape, info.class_name)
    if not isinstance(v, DTensor):
        return CapturedMoment(np_.name, shape, full=to_cpu_float32(v))
    if compression == "rank1" and len(shape) >= 2:
        return CapturedMoment(np_.name, shape, factors=dtensor_rank1_factors(v))  # O(m + n) collectives
    return CapturedMoment(np_.name, shape, full=to_cpu_float32(v.full_tensor()))  # one tensor gathered at a time


def _deepspeed_link_states(info: OptimizerInfo) -> None:
    # ZeRO-1/2 with several parameter groups may not have linked fragments to the optimizer
    # state yet (distributed.md); re-link through the (private) lazy initialiser when present.
    zopt = info.optimizer
    if hasattr(zopt, "_lazy_init_hp_params_optimizer_state") and hasattr(zopt, "_hp_optimizer_states_linked"):
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


def _read_deepspeed(info: OptimizerInfo, np_: NamedParameter, compression: str) -> CapturedMoment | None:
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_optimizer_state

    p, shape = np_.param, np_.shape
    if compression == "rank1" and len(shape) >= 2:
        # Partial row/column sums of this rank's flat fragment, then one all_reduce of m + n values.
        if hasattr(p, "ds_id"):  # ZeRO-3: rank k holds flat elements [k * len, (k + 1) * len)
            frag = safe_get_local_optimizer_state(p, "exp_avg_sq")
            group = getattr(p, "ds_process_group", None)
            rank = (
                info.optimizer._get_param_partition_rank(p)
                if hasattr(info.optimizer, "_get_param_partition_rank")
                else dist.get_rank(group=group)
            )
            start = frag.numel() * rank if frag is not None else 0
        else:  # ZeRO-1/2: this rank's fragment address inside the flat parameter
            mapping = getattr(p, "_hp_mapping", None)
            group = getattr(p, "_dp_group", None)
            frag, start = None, 0
            if mapping is not None:
                frag = mapping.get_hp_fragment("exp_avg_sq")
                start = mapping.lp_fragment_address.start
        if frag is None:
            frag = torch.zeros(0, dtype=torch.float32)
        r, c = flat_fragment_rank1_partials(frag, start, shape)
        rc = torch.cat([r, c]).to(frag.device if frag.numel() else "cpu")
        dist.all_reduce(rc, group=group)
        rc = to_cpu_float32(rc)
        return CapturedMoment(np_.name, shape, factors=(rc[: r.numel()], rc[r.numel() :]))
    v = safe_get_full_optimizer_state(p, "exp_avg_sq")  # collective
    if v is None:
        return None
    return CapturedMoment(np_.name, shape, full=to_cpu_float32(v).reshape(shape))


def iter_second_moments(
    params: list[NamedParameter],
    info: OptimizerInfo,
    engine: str,
    *,
    compression: str = "rank1",
    whole: frozenset[str] | set[str] = frozenset(),
) -> Iterator[CapturedMoment | None]:
    """Yield each trainable parameter's second moment, in ``params`` order.

    Yields ``None`` for a parameter the optimizer holds no state for (never received a
    gradient). Under ``fsdp2`` and ``deepspeed`` every rank must run this to the end, in the
    same order: each step issues collectives.

    Args:
        params: from :func:`~ota_trainer.capture.names.named_trainable_parameters`.
        info: from :func:`inspect_optimizer`.
        engine: from :func:`detect_engine`.
        compression: ``"rank1"`` lets sharded engines reduce row/column sums instead of
            gathering whole tensors; ``"full"`` reads every tensor whole.
        whole: names read whole whatever ``compression`` says (saved split: their moments are
            converted as the weights are, :mod:`~ota_trainer.capture.conversion`).

    Raises:
        CaptureError: a state lacks the expected keys or has the wrong shape.
    """
    if engine == "deepspeed":
        _deepspeed_link_states(info)
    if engine not in ENGINES:
        raise CaptureError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    for np_ in params:
        if engine == "local":
            entry = _read_local(info, np_)
        elif engine == "fsdp2":
            entry = _read_fsdp2(info, np_, "full" if np_.name in whole else compression)
        else:
            entry = _read_deepspeed(info, np_, "full" if np_.name in whole else compression)
        if entry is not None:
            entry.aliases = np_.aliases
        yield entry
