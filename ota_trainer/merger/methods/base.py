"""What a merge method is: a small typed definition (:class:`MergeMethod`) that a file of this
package declares as ``METHOD``. The registry (:mod:`ota_trainer.merger.methods`) finds it; the
recipe parser, the CLI flags, the README's method table, the runner and the tests read it from
there. Neither the runner nor a backend knows a method by its name.

A method declares:

- its parameters (:class:`Param`: type, default, range check, help; which may be set per expert);
- what it needs (a base model, second moments) and whether it grafts (FFG thresholds from the
  experts' moments before merging);
- its per-tensor math as a PyTorch reference, ``torch(job)``: ``job`` is the PyTorch backend's
  view of one tensor (:class:`ota_trainer.backends.torch.TensorJob`); it returns the merged
  ``(m, n)`` tensor in the output dtype;
- optionally a native implementation, ``native(job)`` on raw addresses
  (:class:`ota_trainer.backends.native.backend.NativeJob`), and ``native_covers(recipe,
  inputs)``: why the kernels cannot do a recipe (None when they can). Both must give the
  PyTorch reference's bytes.

Standard library only: a method file imports PyTorch inside its functions, so the registry
(and the runner) load without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...backends.thresholds import SCORES

__all__ = [
    "Param",
    "MergeMethod",
    "SCORES",
    "WEIGHT",
    "POSITIVE_WEIGHT",
    "LAMBDA",
    "EPSILON",
    "BIAS_CORRECTION",
    "NORMALIZE",
    "weight_divisor",
    "in_unit",
    "drop_rate",
    "positive",
    "non_negative",
    "finite",
    "weights_sum",
]


# -- range checks: the problem with a value, or None ---------------------------------------------------
def in_unit(x: Any) -> str | None:
    return None if 0.0 < x <= 1.0 else "must be in (0, 1]"


def drop_rate(x: Any) -> str | None:
    return None if 0.0 <= x < 1.0 else "must be in [0, 1)"


def positive(x: Any) -> str | None:
    return None if x > 0 and math.isfinite(x) else "must be a positive number"


def non_negative(x: Any) -> str | None:
    return None if x >= 0 and math.isfinite(x) else "must be >= 0"


def finite(x: Any) -> str | None:
    return None if math.isfinite(x) else "must be finite"


def curvature_epsilon(x: Any) -> str | None:
    # epsilon is added to float32 curvatures and multiplies float32 edits: beyond ~1e30 the sums overflow
    return None if 0 <= x <= 1e30 else "must be in [0, 1e30] (larger values overflow float32 sums)"


def weights_sum(params: list[dict[str, Any]]) -> str | None:
    """Methods that divide by the sum of the per-expert weights: it must not be zero (unless
    ``normalize: false`` says not to divide)."""
    if any(p.get("normalize") is False for p in params) or any(isinstance(p["weight"], list) for p in params):
        return None  # per-tensor weights: checked tensor by tensor (the merge names the tensor)
    total = sum(p["weight"] for p in params)
    return None if abs(total) > 1e-12 else f"the experts' weights sum to {total:g}, and the merge divides by that sum"


@dataclass(frozen=True)
class Param:
    """One method parameter: ``kind`` and ``default`` (``None`` = unset), whether it may be set per model."""

    name: str
    kind: type
    default: Any
    help: str
    per_model: bool = False
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    optional: bool = False  # None is an accepted value
    varies: bool = False  # may vary per tensor (mergekit's gradients and filters; per_model only)

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` as this parameter's type, checked.

        Raises:
            ConfigError: naming ``where``, the parameter and the value.
        """
        from ...errors import ConfigError, brief

        if value is None and self.optional:
            return None
        try:
            if self.kind is bool:
                if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                    value = value.lower() in ("true", "1", "yes")
                elif not isinstance(value, bool):
                    raise TypeError
            elif self.kind is float:
                if isinstance(value, bool):
                    raise TypeError
                value = float(value)
            elif self.kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                value = int(value)
            elif not isinstance(value, str):
                raise TypeError
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: {self.name}={brief(value)} is not a {self.kind.__name__}") from None
        if self.choices and value not in self.choices:
            raise ConfigError(f"{where}: {self.name}={brief(value)}; choose one of {list(self.choices)}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ConfigError(f"{where}: {self.name}={brief(value)} {problem}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A merge method (see the module docstring). ``order`` sorts the methods in tables."""

    name: str
    pretty_name: str
    reference_url: str
    description: str  # the formula, per entry
    needs_base: bool
    needs_moments: bool
    params: tuple[Param, ...]
    torch: Callable[[Any], Any]
    native: Callable[[Any], bool] | None = None
    native_covers: Callable[[Any, Any], str | None] | None = None
    check_recipe: Callable[[list[dict[str, Any]]], str | None] | None = None
    # mergekit's spellings of this method's parameters -> ours: (parameters, where) -> parameters
    translate: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    grafts: bool = False
    # its native implementation counts, beside each mask's kept entries, those kept at the two
    # check cuts of ``job.checks`` into ``job.checked`` (a histogram not counted by this merge
    # can then be proved: see ota_trainer.merger.runner)
    native_checks: bool = False
    order: int = 100

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# parameters several methods share
WEIGHT = Param("weight", float, 1.0, "per-model scale of its contribution", per_model=True, check=finite, varies=True)
POSITIVE_WEIGHT = Param(
    "weight", float, 1.0, "per-model scale of its curvature weights (> 0)", per_model=True, check=positive, varies=True
)
LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector", check=finite)
EPSILON = Param(
    "epsilon", float, 1e-26, "added to curvature weights so no division is by zero", check=curvature_epsilon
)
BIAS_CORRECTION = Param(
    "bias_correction", bool, True, "divide v by 1 - beta2**step (Adam's bias correction) per expert"
)
NORMALIZE = Param(
    "normalize",
    bool,
    None,
    "mergekit's normalize: true divides the summed weighted edits by the sum of the weights of the experts "
    "that contribute to each entry, false does not divide; unset: this method's own rule (its formula)",
    optional=True,
)


def weight_divisor(weights, contributes=None):
    """mergekit's ``normalize: true`` divisor: ``sum_t c_t`` over the experts that contribute to
    each entry (``contributes``: a bool ``(T, ...)`` mask; None: all of them), 1 where that is 0
    (``|sum| < 1e-8`` without a mask), float32."""
    import torch

    w = torch.tensor([float(c) for c in weights], dtype=torch.float32)
    if contributes is None:
        total = float(w.sum())
        return torch.tensor(1.0 if abs(total) < 1e-8 else total)
    w = w.reshape((-1,) + (1,) * (contributes.dim() - 1))
    div = (w * contributes).sum(dim=0)
    return div.masked_fill_(div == 0, 1.0)
