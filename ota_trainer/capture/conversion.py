"""Moments follow the weights through the conversion ``save_pretrained`` applies.

transformers 5 keeps some weights in memory in another layout than it saves them: MoE
experts fused into one tensor per layer (``mlp.experts.gate_up_proj``, shape ``(E, 2I, H)``)
are written per expert (``block_sparse_moe.experts.3.w1.weight``), routers are renamed, and so
on, through each model's conversion mapping. The second moment of a fused tensor is a tensor
of the same shape, so the same conversion, applied to it, gives each saved weight its moment.
:class:`SavedLayout` learns that conversion from transformers' own
``revert_weight_conversion`` on meta tensors (no data) and applies it to the moments, one
group of parameters at a time: nothing is re-implemented per architecture.

PyTorch and transformers only; no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

from ..errors import CaptureError
from .sources import CapturedMoment

logger = logging.getLogger(__name__)

__all__ = ["SavedLayout"]


def _revert():
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: weights are saved as they are held
        return None
    return revert_weight_conversion


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself inside DDP / DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None) or model
    return model


class SavedLayout:
    """How the names (and tensors) a model holds map to the ones ``save_pretrained`` writes.

    Args:
        model: the trained model (wrappers allowed).
        shapes: every parameter's name (as :mod:`~ota_trainer.capture.names` cleans it) and
            full shape, trainable and frozen.

    Attributes:
        active: whether any name changes on save (False: the identity, nothing to do).
    """

    def __init__(self, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]):
        self._model = _unwrap(model)
        self._groups: dict[str, tuple[str, ...]] = {}  # held name -> the names converted with it
        self._saved: dict[str, list[str]] = {}  # held name -> the saved names its group writes
        revert = _revert()
        self.active = False
        if revert is None or getattr(self._model, "peft_config", None) is not None or not shapes:
            return
        meta = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
        try:
            joint = revert(self._model, dict(meta))
        except Exception as e:  # noqa: BLE001 - a model whose conversion fails on meta tensors: say so
            raise CaptureError(f"cannot follow the checkpoint conversion of {type(self._model).__name__}: {e}") from e
        changed = [n for n in shapes if n not in joint or tuple(joint[n].shape) != tuple(shapes[n])]
        if not changed:
            return
        self.active = True
        together = []
        for n in changed:
            try:
                out = revert(self._model, {n: meta[n]})
            except Exception:  # noqa: BLE001 - a conversion that needs its partners: converted jointly below
                out = None
            if out is None or not set(out) <= set(joint) or n in out:
                together.append(n)
            else:
                self._groups[n], self._saved[n] = (n,), list(out)
        if together:
            out = revert(self._model, {n: meta[n] for n in together})
            for n in together:
                self._groups[n], self._saved[n] = tuple(together), list(out)
        produced = {s for n in changed for s in self._saved[n]} | {n for n in shapes if n not in changed}
        if produced != set(joint):
            raise CaptureError(
                f"cannot follow the checkpoint conversion of {type(self._model).__name__}: the saved names "
                f"{sorted(set(joint) ^ produced)[:5]} do not come from single parameters"
            )
        logger.info(
            "%d parameter(s) are saved under other names or split (e.g. %s -> %s): their moments follow",
            len(changed),
            changed[0],
            self._saved[changed[0]][:2],
        )

    def saved_names(self, name: str) -> list[str]:
        """The names ``save_pretrained`` writes for held parameter ``name`` (its group's, when
        several parameters convert together)."""
        return self._saved.get(name, [name])

    def convert(self, entries: Iterable[CapturedMoment | None]) -> Iterator[CapturedMoment | None]:
        """``entries`` (held names, in order) as the saved weights' moments: unchanged entries
        pass through; a converted one (read whole) is collected with its group, converted with
        transformers' own reverse conversion and yielded per saved tensor, float32."""
        revert = _revert()
        pending: dict[str, torch.Tensor] = {}
        for e in entries:
            if e is None or not self.active or e.name not in self._groups:
                yield e
                continue
            if e.full is None:
                raise CaptureError(
                    f"{e.name}: saved split into {len(self._saved[e.name])} tensors (e.g. {self._saved[e.name][0]}), "
                    "so its second moment must be read whole; this optimizer or engine gave only row/column sums "
                    "(Adafactor, or a sharded rank-one read): use AdamW, or compression='full'"
                )
            pending[e.name] = e.full
            group = self._groups[e.name]
            if not all(n in pending for n in group):
                continue
            with torch.no_grad():
                out = revert(self._model, {n: pending.pop(n) for n in group})
            for name, v in out.items():
                v = v[0] if isinstance(v, list) else v
                yield CapturedMoment(name, tuple(v.shape), full=v.to(torch.float32).contiguous())
        if pending:
            raise CaptureError(f"moments of {sorted(pending)} were read without the rest of their conversion group")
