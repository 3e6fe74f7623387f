"""Which name each trainable parameter's moments are stored under.

Optimizer state is keyed by parameter object, not by name (method.md §1). This module maps
each parameter object to the ONE name under which ``save_pretrained`` writes its weight, so
that every weight name in the saved safetensors that has a trainable parameter finds its
moments, and the moments file names nothing the weights file lacks:

* wrappers are peeled off: ``module.`` (DDP), ``_orig_mod.`` (``torch.compile``),
  ``_fsdp_wrapped_module.`` (FSDP1), ``_checkpoint_wrapped_module.`` (activation
  checkpointing);
* tied weights (``lm_head.weight`` tied to ``model.embed_tokens.weight``) are one parameter
  with one optimizer state: stored once, under the name that is not a tie *target* in the
  model's ``_tied_weights_keys`` (transformers drops tie targets when saving);
* PEFT adapters: the adapter-name segment (``.default``) is removed, as
  ``get_peft_model_state_dict`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "NamedParameter",
    "clean_parameter_name",
    "tied_target_names",
    "named_trainable_parameters",
    "trainable_weights",
]

# Segments wrappers insert anywhere in a name; DDP's ``module.`` only ever leads.
_WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


@dataclass(frozen=True)
class NamedParameter:
    """A parameter and the names it goes by.

    Attributes:
        name: the name its weight (and moments) are saved under.
        param: the parameter object (the optimizer state key).
        aliases: every other name of the same object (tied weights), cleaned.
    """

    name: str
    param: torch.nn.Parameter
    aliases: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The full logical shape (``ds_shape`` under DeepSpeed ZeRO-3, global shape of a DTensor)."""
        ds_shape = getattr(self.param, "ds_shape", None)
        return tuple(int(d) for d in (ds_shape if ds_shape is not None else self.param.shape))


def clean_parameter_name(name: str, *, adapter_name: str | None = None) -> str:
    """``name`` without wrapper segments (``module.``, ``_orig_mod.``, ...) and, for PEFT, the
    ``.<adapter_name>`` segment.

    >>> clean_parameter_name("module._orig_mod.model.norm.weight")
    'model.norm.weight'
    """
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] == "module":  # DDP / DataParallel / DeepSpeed engine
        parts = parts[1:]
    cleaned = ".".join(parts)
    if adapter_name:
        cleaned = cleaned.replace(f".{adapter_name}.", ".")
        if cleaned.endswith(f".{adapter_name}"):
            cleaned = cleaned[: -len(adapter_name) - 1]
    return cleaned


def tied_target_names(model: torch.nn.Module) -> list[str]:
    """Names (or regex patterns) transformers treats as tie targets, dropped on save.

    Read from every submodule's ``_tied_weights_keys`` (a ``{target: source}`` dict in
    transformers 5, a list of patterns in 4.x), prefixed by the submodule's name.
    """
    out: list[str] = []
    for prefix, sub in model.named_modules():
        keys = getattr(sub, "_tied_weights_keys", None) or ()
        keys = list(keys.keys()) if isinstance(keys, dict) else list(keys)
        prefix = clean_parameter_name(prefix)
        out.extend(f"{prefix}.{k}" if prefix else k for k in keys)
    return out


def _is_tie_target(name: str, patterns: list[str]) -> bool:
    return any(name == p or re.search(p, name) for p in patterns)


def _adapter_name(model: torch.nn.Module) -> str | None:
    if getattr(model, "peft_config", None) is None:
        return None
    active = getattr(model, "active_adapter", None)
    return active if isinstance(active, str) else None


def named_trainable_parameters(model: torch.nn.Module) -> tuple[list[NamedParameter], list[str]]:
    """Trainable parameters, each once, under its saved name; and the frozen parameters' names.

    Order is ``model.named_parameters()`` order, identical on every rank (collectives rely on it).

    Returns:
        ``(trainable, frozen)``: :class:`NamedParameter` for each trainable parameter object,
        and the saved names of frozen ones.
    """
    adapter = _adapter_name(model)
    aliases: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        name = clean_parameter_name(raw, adapter_name=adapter)
        names = aliases.setdefault(id(p), [])
        if name not in names:
            names.append(name)
        params[id(p)] = p
    patterns = tied_target_names(model) if any(len(v) > 1 for v in aliases.values()) else []
    trainable: list[NamedParameter] = []
    frozen: list[str] = []
    for key, names in aliases.items():
        kept = [n for n in names if not _is_tie_target(n, patterns)] or names
        name = kept[0]
        p = params[key]
        if p.requires_grad:
            trainable.append(NamedParameter(name, p, tuple(n for n in names if n != name)))
        else:
            frozen.append(name)
    return trainable, frozen


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every trainable parameter under each name it is saved or known by (a tied weight under
    all of them): the weights the moments of :func:`named_trainable_parameters` belong to."""
    params, _ = named_trainable_parameters(model)
    return {n: p.param for p in params for n in (p.name, *p.aliases)}
