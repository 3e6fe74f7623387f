"""The merge methods: one table of name -> :class:`MergeMethod` with its parameters.

Each method says whether it needs a base model and second moments, which parameters it
takes (global, and which of them may be set per model), and cites its paper. The math is
in :mod:`ota_trainer.backends.torch.ops` (and :mod:`ota_trainer.backends.torch.ffg` for FFG).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


__all__ = ["Param", "MergeMethod", "METHODS", "get_method"]


def _in_unit(x: Any) -> str | None:
    return None if 0.0 < x <= 1.0 else "must be in (0, 1]"


def _drop(x: Any) -> str | None:
    return None if 0.0 <= x < 1.0 else "must be in [0, 1)"


def _positive(x: Any) -> str | None:
    return None if x > 0 and math.isfinite(x) else "must be a positive number"


def _non_negative(x: Any) -> str | None:
    return None if x >= 0 and math.isfinite(x) else "must be >= 0"


def _finite(x: Any) -> str | None:
    return None if math.isfinite(x) else "must be finite"


def _epsilon(x: Any) -> str | None:
    # epsilon is added to float32 curvatures and multiplies float32 edits: beyond ~1e30 the sums overflow
    return None if 0 <= x <= 1e30 else "must be in [0, 1e30] (larger values overflow float32 sums)"


def _power(x: Any) -> str | None:
    return None if 0 <= x <= 2 else "must be in [0, 2] (0: uniform weights, 0.5: the paper's, 1: Fisher's)"


def _weights_sum(params: list[dict[str, Any]]) -> str | None:
    """Linear averaging divides by the sum of the per-expert weights: it must not be zero."""
    total = sum(p["weight"] for p in params)
    return None if abs(total) > 1e-12 else f"the experts' weights sum to {total:g}; linear averaging divides by that sum"


SCORES = ("fisher", "magnitude")  # FFG saliency scores

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

    def coerce(self, value: Any, where: str) -> Any:
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
    name: str
    pretty_name: str
    reference_url: str
    needs_base: bool
    needs_moments: bool
    params: tuple[Param, ...]
    description: str
    # a check over every expert's resolved parameters: the problem, or None
    check_recipe: Callable[[list[dict[str, Any]]], str | None] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_WEIGHT = Param("weight", float, 1.0, "per-model scale of its contribution", per_model=True, check=_finite)
_POS_WEIGHT = Param("weight", float, 1.0, "per-model scale of its curvature weights (> 0)", per_model=True, check=_positive)
_LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector", check=_finite)
_EPS = Param("epsilon", float, 1e-26, "added to curvature weights so no division is by zero", check=_epsilon)
_BIAS = Param("bias_correction", bool, True, "divide v by 1 - beta2**step (Adam's bias correction) per expert")

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "ota",
            "OTA + Fast Fisher Grafting",
            "https://arxiv.org/abs/2509.11167",
            needs_base=True,
            needs_moments=True,
            description="w0 + sum_t W_t d_t / sum_t W_t, W_t = c_t (v_t**power + epsilon) M_t, M_t from FFG",
            params=(
                Param("graft", bool, True, "apply Fast Fisher Grafting before aggregation (false: OTA without FFG)"),
                Param("density", float, None, "fraction of each expert's entries FFG keeps (global over the expert; default 0.4 when no threshold is given)", per_model=True, check=_in_unit, optional=True),
                Param("threshold", float, None, "absolute FFG saliency threshold theta (the paper's configs); excludes density", per_model=True, check=_non_negative, optional=True),
                Param("saliency_share", float, None, "keep the fewest top edits holding this share of the expert's total saliency sum(v*d^2); excludes density/threshold", per_model=True, check=_in_unit, optional=True),
                Param("per_tensor", bool, False, "apply density per tensor instead of globally (ablation)"),
                Param("score", str, "fisher", "FFG saliency: fisher = v*d^2, magnitude = d^2 (ablation)", choices=SCORES),
                Param("power", float, 0.5, "p in P_t = v_t**p", check=_power),
                _EPS,
                Param("normalise", str, "none", "per-tensor normalisation of P_t", choices=("none", "mean")),
                _BIAS,
                _POS_WEIGHT,
            ),
        ),
        MergeMethod(
            "fisher",
            "Fisher merging",
            "https://arxiv.org/abs/2111.09832",
            needs_base=False,
            needs_moments=True,
            description="sum_t c_t (v_t + epsilon) w_t / sum_t c_t (v_t + epsilon)",
            params=(_EPS, _BIAS, _POS_WEIGHT),
        ),
        MergeMethod(
            "task_arithmetic",
            "Task arithmetic",
            "https://arxiv.org/abs/2212.04089",
            needs_base=True,
            needs_moments=False,
            description="w0 + lambda * sum_t c_t d_t",
            params=(_LAMBDA, _WEIGHT),
        ),
        MergeMethod(
            "linear",
            "Linear (weight averaging)",
            "https://arxiv.org/abs/2203.05482",
            needs_base=False,
            needs_moments=False,
            description="sum_t c_t w_t / sum_t c_t",
            params=(_WEIGHT,),
            check_recipe=_weights_sum,
        ),
        MergeMethod(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            needs_base=True,
            needs_moments=False,
            description="trim to top-density |d_t| per tensor, elect signs, disjoint mean, scale by lambda",
            params=(Param("density", float, 0.2, "fraction of each tensor's edits kept by magnitude", per_model=True, check=_in_unit), _LAMBDA, _WEIGHT),
        ),
        MergeMethod(
            "dare",
            "DARE",
            "https://arxiv.org/abs/2311.03099",
            needs_base=True,
            needs_moments=False,
            description="drop each edit with probability drop_rate, rescale by 1/(1-drop_rate), add with lambda",
            params=(
                Param("drop_rate", float, 0.5, "probability q of dropping each edit", per_model=True, check=_drop),
                Param("seed", int, 0, "random seed (the result is deterministic given it)"),
                _LAMBDA,
                _WEIGHT,
            ),
        ),
    )
}


def get_method(name: str) -> MergeMethod:
    """The method called ``name``.

    Raises:
        ConfigError: unknown method (the message lists the known ones).
    """
    from ...errors import ConfigError, brief

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {brief(name)}; choose one of {sorted(METHODS)}") from None
