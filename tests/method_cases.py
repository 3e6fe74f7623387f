"""The shared table of merge-method cases (#14): one row per method (more for options worth
their own check). Adding a method is its file in ota_trainer/merger/methods/ plus a row here;
tests/test_methods.py runs every property on every row.

A row: ``(id, method, parameters, reference, tolerance)``. ``reference(ins, params)`` computes
the expected merge from fully loaded float64 state dicts with the independent code of
tests/reference.py (``ins``: ``base``, ``experts``, ``vs`` (moments)); ``tolerance``:
the largest absolute difference allowed (float32 arithmetic against float64), or a callable
``(got, want) -> problem or None`` for methods whose exact comparison needs more care.
"""

from __future__ import annotations

import reference as ref

CASES = [
    (
        "ota",
        "ota",
        {"graft": False, "elect_sign": False},
        lambda ins, p: ref.ota(ins["base"], ins["experts"], ins["vs"], ref.keep_all(ins)),
        1e-6,
    ),
    (
        "ota_density",
        "ota",
        {"density": 0.3, "elect_sign": False},
        lambda ins, p: ref.ota(
            ins["base"], ins["experts"], ins["vs"], ref.ffg_masks_density(ins["base"], ins["experts"], ins["vs"], 0.3)
        ),
        ref.mostly_close(0.001),
    ),  # a histogram bin edge: only entries at the boundary may differ
    (
        "ota_share",
        "ota",
        {"saliency_share": 0.99, "elect_sign": False},
        lambda ins, p: ref.ota(
            ins["base"], ins["experts"], ins["vs"], ref.ffg_masks_share(ins["base"], ins["experts"], ins["vs"], 0.99)
        ),
        ref.mostly_close(0.002),
    ),  # whole histogram bins (each under 0.1% wide) are kept: only entries at the boundary may differ
    (
        "ota_elect_sign",
        "ota",
        {"graft": False, "elect_sign": True},
        lambda ins, p: ref.ota_elect(ins["base"], ins["experts"], ins["vs"], ref.keep_all(ins)),
        1e-6,
    ),
    ("fisher", "fisher", {}, lambda ins, p: ref.fisher(ins["experts"], ins["vs"]), 1e-5),
    (
        "task_arithmetic",
        "task_arithmetic",
        {"lambda": 0.7},
        lambda ins, p: ref.task_arithmetic(ins["base"], ins["experts"], 0.7),
        1e-6,
    ),
    ("linear", "linear", {}, lambda ins, p: ref.linear(ins["experts"]), 1e-6),
    (
        "ties",
        "ties",
        {"density": 0.3, "lambda": 1.2},
        lambda ins, p: ref.ties(ins["base"], ins["experts"], 0.3, 1.2),
        1e-6,
    ),
    (
        "dare",
        "dare",
        {"drop_rate": 0.6, "seed": 3, "lambda": 0.9},
        lambda ins, p: ref.dare(ins["base"], ins["experts"], 0.6, 3, 0.9),
        1e-5,
    ),
    (
        "dare_ties",
        "dare_ties",
        {"density": 0.4, "seed": 7, "lambda": 1.1},
        lambda ins, p: ref.dare_ties(ins["base"], ins["experts"], 0.4, 7, 1.1),
        1e-5,
    ),
    (
        "dare_linear",
        "dare_linear",
        {"density": 0.6, "seed": 2, "lambda": 1.3},
        lambda ins, p: ref.dare_linear(ins["base"], ins["experts"], 0.6, 2, 1.3),
        1e-5,
    ),
    (
        "breadcrumbs",
        "breadcrumbs",
        {"density": 0.3, "gamma": 0.05, "lambda": 0.8},
        lambda ins, p: ref.breadcrumbs(ins["base"], ins["experts"], 0.3, 0.05, 0.8),
        1e-6,
    ),
    (
        "della",
        "della",
        {"density": 0.6, "epsilon": 0.2, "seed": 5, "lambda": 1.2},
        lambda ins, p: ref.della(ins["base"], ins["experts"], 0.6, 0.2, 5, 1.2),
        1e-5,
    ),
]
