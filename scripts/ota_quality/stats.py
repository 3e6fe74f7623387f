"""Error bars for the quality benchmark: bootstrap over prompts, stratified by capability.

A model's *normalised score* is the mean over capabilities of (its score / the expert's own
score on that capability). Its uncertainty comes from the finite prompt sets, so one bootstrap
resample draws, within every capability, as many prompts as it has, with replacement, and
recomputes the whole statistic (experts' scores included, from the same draw). For "A beats
B", both are computed on the same draws (paired): what varies is the prompt set, not the
pairing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["Interval", "bootstrap", "norm_rows", "normalised", "paired", "mean_ci"]

Scores = Mapping[str, Sequence[float]]  # capability -> per-prompt scores (0/1), in prompt order


class Interval(tuple):
    """(estimate, low, high) of a 95% (by default) percentile bootstrap interval."""

    __slots__ = ()

    def __new__(cls, est: float, lo: float, hi: float):
        return super().__new__(cls, (float(est), float(lo), float(hi)))

    est = property(lambda self: self[0])
    lo = property(lambda self: self[1])
    hi = property(lambda self: self[2])

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def as_dict(self) -> dict[str, float]:
        return {"est": self.est, "lo": self.lo, "hi": self.hi}


def _draws(sizes: Mapping[str, int], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, n, size=(n_boot, n)) for c, n in sizes.items()}


def bootstrap(
    stat: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Interval:
    """A percentile interval of ``stat``. ``groups[name][capability]`` are per-prompt scores of
    one model (prompt k of a capability is the same prompt for every model); ``stat`` gets,
    per name, a ``{capability: array (n_boot + 1, n)}`` whose row 0 is the observed data and
    the others are resamples, and returns one value per row."""
    sizes: dict[str, int] = {}
    for name, scores in groups.items():
        for c, s in scores.items():
            if sizes.setdefault(c, len(s)) != len(s):
                raise ValueError(f"{name}: {c} has {len(s)} scores, another model {sizes[c]} (not paired)")
    draws = _draws(sizes, n_boot, seed)
    arrays = {}
    for name, scores in groups.items():
        arrays[name] = {}
        for c, s in scores.items():
            a = np.asarray(s, dtype=np.float64)
            arrays[name][c] = np.vstack([a[None, :], a[draws[c]]])
    values = np.asarray(stat(arrays), dtype=np.float64)
    lo, hi = np.quantile(values[1:], [alpha / 2, 1 - alpha / 2])
    return Interval(values[0], lo, hi)


def norm_rows(model: Mapping[str, np.ndarray], experts: Mapping[str, Mapping[str, np.ndarray]]) -> np.ndarray:
    """Per row: mean over capabilities of model score / expert score (the expert's own capability)."""
    parts = []
    for c, x in model.items():
        own = experts[c].mean(axis=1)
        parts.append(x.mean(axis=1) / np.maximum(own, 1e-9))
    return np.mean(parts, axis=0)


def normalised(model: Scores, experts: Mapping[str, Sequence[float]], **kw) -> Interval:
    """The normalised score of ``model`` (capability -> scores) given each capability's expert
    scores on it (capability -> scores), with its interval."""
    groups = {"model": model, **{f"expert:{c}": {c: s} for c, s in experts.items()}}
    return bootstrap(lambda a: norm_rows(a["model"], {c: a[f"expert:{c}"][c] for c in experts}), groups, **kw)


def paired(a: Scores, b: Scores, experts: Mapping[str, Sequence[float]] | None = None, **kw) -> Interval:
    """Normalised score of A minus B (raw mean over capabilities when ``experts`` is None) on the
    same resampled prompts. ``excludes_zero()`` with est > 0: A beats B at the chosen level."""
    groups = {"a": a, "b": b}
    if experts is None:
        return bootstrap(
            lambda x: np.mean([x["a"][c].mean(axis=1) - x["b"][c].mean(axis=1) for c in a], axis=0), groups, **kw
        )
    groups.update({f"expert:{c}": {c: s} for c, s in experts.items()})

    def diff(x):
        ex = {c: x[f"expert:{c}"][c] for c in experts}
        return norm_rows(x["a"], ex) - norm_rows(x["b"], ex)

    return bootstrap(diff, groups, **kw)


def mean_ci(scores: Sequence[float], **kw) -> Interval:
    """A plain mean of per-prompt scores with its interval."""
    return bootstrap(lambda a: a["x"]["s"].mean(axis=1), {"x": {"s": scores}}, **kw)
