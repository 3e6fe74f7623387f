"""How the quality benchmark chooses ``ota``'s default on the dev split.

The issue's target has three parts: the five-way merge, forgetting, and the pairs. Choosing on
the five-way merge alone picked a setting (``saliency_share: 0.99`` with the sign election) that
won there and lost on merges of fewer experts it was never chosen on. So the dev choice looks at
merges of two sizes, each with its own weight:

    J(S) = 1/2 * N_dev(S, all experts) + 1/2 * mean over the pairs p of N_dev(S, p)

where N_dev is the normalised dev score (mean over the merge's capabilities of merge / expert
score). The pairs of a study are merged only for the shortlist (:func:`shortlist`): the paper's
recipe and every study that beats it on the five-way dev merge in every seed, so the pair
merges stay a few per study. A candidate's pairs are merged in a seed only while it beats the
paper's recipe in every seed before (:func:`alive`): the rule below needs that in every seed, so
the candidates it drops could not have won (cost, measured: the 200 pair merges of every
candidate in both seeds took 67 min, about a third of the benchmark, on a dev split of 150
prompts per capability).

The choice (:func:`choose`) is the shortlisted study with the best J averaged over the seeds
among those whose J beats the paper recipe's by a paired 95% interval above zero in every seed
(the paper's recipe when none does), and of those the best does not beat by such an interval,
the one that changes the fewest of the paper recipe's settings: each change a default makes
needs the same evidence. J's interval, and its difference from the paper's recipe, come from
one bootstrap over the dev prompts (each capability's prompts are the same in every merge, so
one draw resamples them all alike; a pair's mean is over the drawn prompts it was evaluated on).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from . import stats
from .lm_tasks import expert_scores, split_scores

__all__ = [
    "PAIR_WEIGHT",
    "pairs_of",
    "pair_key",
    "objective",
    "shortlist",
    "alive",
    "choose",
]

PAIR_WEIGHT = 0.5  # J's weight of the mean pair score; the five-way merge has the rest


def pairs_of(caps: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(caps, 2))


def pair_key(a: str, b: str, study: str) -> str:
    """The key of a study's dev merge of the pair (a, b) in a seed's ``dev_pairs``."""
    return f"{a}+{b}/{study}"


def _dev(result: dict, caps: Sequence[str]) -> dict[str, list[float]] | None:
    """A merge's dev scores on every one of ``caps`` (None if one is missing)."""
    got = split_scores(result, caps, "dev")
    return got if len(got) == len(caps) else None


def _groups(seed_result: dict, study: str, caps: Sequence[str], tag: str) -> dict | None:
    """The per-prompt dev scores J(study) needs, under names prefixed by ``tag`` (None if any is missing)."""
    five = seed_result.get("sweeps", {}).get(study)
    five = _dev(five, caps) if five is not None else None
    if five is None:
        return None
    groups = {f"{tag}five": five}
    for a, b in pairs_of(caps):
        res = seed_result.get("dev_pairs", {}).get(pair_key(a, b, study))
        got = _dev(res, (a, b)) if res is not None else None
        if got is None or any(len(got[c]) != len(five[c]) for c in got):
            return None
        groups[f"{tag}pair:{a}+{b}"] = got
    return groups


def _j(x: dict, caps: Sequence[str], tag: str, pair_weight: float) -> np.ndarray:
    """J per bootstrap row, from resampled arrays (``stats.bootstrap``'s form)."""
    experts = {c: x[f"expert:{c}"][c] for c in caps}
    pairs = [stats.norm_rows(x[f"{tag}pair:{a}+{b}"], experts) for a, b in pairs_of(caps)]
    return (1 - pair_weight) * stats.norm_rows(x[f"{tag}five"], experts) + pair_weight * np.mean(pairs, axis=0)


def objective(
    seed_result: dict,
    study: str,
    caps: Sequence[str],
    minus: str | None = None,
    n_boot: int = 2000,
    pair_weight: float = PAIR_WEIGHT,
) -> stats.Interval | None:
    """J(study) on one seed's dev split, or J(study) - J(minus) paired on the same prompts, with a
    95% bootstrap interval (None until the experts, the five-way merge and every pair are evaluated).
    ``pair_weight`` 0 or 1: its five-way or its mean pair score alone."""
    experts = expert_scores(seed_result, caps, "dev")
    groups = _groups(seed_result, study, caps, "a:")
    other = _groups(seed_result, minus, caps, "b:") if minus is not None else {}
    if experts is None or groups is None or other is None:
        return None
    groups = {**groups, **other, **{f"expert:{c}": {c: s} for c, s in experts.items()}}
    if minus is None:
        return stats.bootstrap(lambda x: _j(x, caps, "a:", pair_weight), groups, n_boot=n_boot)
    return stats.bootstrap(
        lambda x: _j(x, caps, "a:", pair_weight) - _j(x, caps, "b:", pair_weight), groups, n_boot=n_boot
    )


def _five(seed_result: dict, study: str, caps: Sequence[str]) -> float | None:
    experts = expert_scores(seed_result, caps, "dev")
    res = seed_result.get("sweeps", {}).get(study)
    five = _dev(res, caps) if res is not None else None
    if five is None or experts is None:
        return None
    return stats.normalised(five, experts, n_boot=1).est  # (the estimate)


def shortlist(results: dict, studies: Sequence[str], paper: str, caps: Sequence[str]) -> list[str] | None:
    """The candidates for the default: ``paper`` (the paper's recipe) first, then every study of
    ``studies`` whose five-way dev score beats the paper's in every seed, best mean first (None
    until every seed has every study's five-way dev merge)."""
    seeds = list(results["seeds"].values())
    scores = {s: [_five(r, s, caps) for r in seeds] for s in dict.fromkeys([paper, *studies])}
    if not seeds or any(v is None for got in scores.values() for v in got):
        return None
    better = [s for s in scores if s != paper and all(v > p for v, p in zip(scores[s], scores[paper]))]
    return [paper, *sorted(better, key=lambda s: -sum(scores[s]))]


def _beats_paper(seed_result: dict, study: str, paper: str, caps: Sequence[str]) -> bool | None:
    d = objective(seed_result, study, caps, minus=paper)
    return None if d is None else d.lo > 0


def alive(results: dict, candidates: Sequence[str], caps: Sequence[str], seeds: Sequence[str]) -> list[str] | None:
    """The candidates still able to win after ``seeds``: the paper's recipe (``candidates[0]``),
    then those whose J beats its J by a paired interval above zero in every one of ``seeds``, in
    order (a candidate's pairs stop at the first seed it loses, so the seeds after it are not
    looked at); None until a candidate's pairs are evaluated in the seeds it reached."""
    paper, out = candidates[0], []
    for study in candidates[1:]:
        for s in seeds:
            won = _beats_paper(results["seeds"][s], study, paper, caps)
            if won is None:
                return None
            if not won:
                break
        else:
            out.append(study)
    return [paper, *out]


def choose(
    results: dict, candidates: Sequence[str], caps: Sequence[str], changes: Mapping[str, int] | None = None
) -> str | None:
    """The default (None until every candidate is evaluated):

    1. the winners: the candidates whose J beats the paper recipe's (``candidates[0]``) by a
       paired interval above zero in every seed; none: the paper's recipe stays (a default
       changes on evidence, not on a point estimate);
    2. the best: the winner with the best J averaged over the seeds;
    3. the same evidence rule for each setting a winner changes: of the winners the best does
       not beat by a paired interval above zero in any seed, the one that changes the fewest of
       the paper recipe's settings (``changes[study]``), then the best mean J.
    """
    if not candidates:
        return None
    still = alive(results, candidates, caps, list(results["seeds"]))
    if still is None:
        return None
    paper, winners = still[0], still[1:]
    if not winners:
        return paper
    seeds = list(results["seeds"].values())
    means = {s: float(np.mean([objective(r, s, caps, n_boot=1).est for r in seeds])) for s in winners}
    best = max(winners, key=means.get)
    close = [s for s in winners if s == best or all(objective(r, best, caps, minus=s).lo <= 0 for r in seeds)]
    return min(close, key=lambda s: ((changes or {}).get(s, 0), -means[s]))
