"""The two entry points: :func:`inspect_experts` (the numbers of :mod:`.measures` and their
:func:`~.reading.findings`) and :func:`write_diagnostics` (``diagnostics.json``, the figures of
:mod:`.plots` and the ``summary.md`` of :mod:`.summary`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..merger.report import local_resolver as _local_resolver
from .measures import Inspector, Resolver
from .plots import plot_diagnostics
from .reading import findings
from .summary import render_summary

DIAGNOSTICS_FILE = "diagnostics.json"
SUMMARY_FILE = "summary.md"


def inspect_experts(
    base: str | os.PathLike,
    experts: Sequence[str | os.PathLike],
    *,
    density: float = 0.4,
    topk: float = 0.1,
    bias_correction: bool = True,
    resolver: Resolver | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Where FFG cuts and how the experts' curvature overlaps, streamed tensor by tensor.

    Two passes over the base, the experts and their moments, holding one tensor name at a
    time: the first builds each expert's global FFG and magnitude thresholds (the merge
    engine's :class:`SaliencyHistogram`), the second builds the masks and every statistic.

    Args:
        base: the base model (folder, or anything ``resolver`` accepts).
        experts: the fine-tuned experts; those without a moments file get magnitude
            diagnostics only.
        density: fraction of each expert's entries kept, by FFG and by magnitude pruning
            (global threshold over the expert, as ``merge(..., density=)``).
        topk: fraction of each tensor's entries counted as "top curvature" for the
            curvature-overlap Jaccard.
        bias_correction: divide ``v`` by ``1 - beta2**step`` (the merge default; a per-expert
            constant, so it changes no mask beyond histogram-bin rounding).
        resolver: turns a model reference into a local folder (default: it is a folder);
            the Hub layer's resolver plugs in here.
        quiet: no progress bars.

    Returns:
        A JSON-serialisable dict: ``models``, ``density``, ``topk``, ``layers``, ``roles``;
        ``experts[i]`` with ``ffg`` and ``magnitude`` (threshold, achieved density, kept
        fraction ``by_role``/``by_layer``/``by_layer_role``, row/column sparsity ``lines``
        per role) and ``rank1_quality`` (full moments only); ``pairs`` with ``curvature``
        and ``mask_overlap`` (``overall``/``by_role``/``by_layer``/``by_layer_role``);
        ``tensors``, one record per tensor. Undefined ratios are ``None``.

    Raises:
        ConfigError: density not in (0, 1], topk not in (0, 1), or no experts.
        FormatError, IncompatibleModelsError, NumericalError: as for :func:`ota_trainer.merge`.

    Example:
        >>> diag = inspect_experts("base", ["math", "code"], density=0.4)
        >>> diag["experts"][0]["ffg"]["by_role"]["q"]["fraction"]
        0.07
    """
    if not experts:
        raise ConfigError("give at least one expert to inspect")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density={density} must be in (0, 1] (the fraction of each expert's edits kept)")
    if not 0.0 < topk < 1.0:
        raise ConfigError(f"topk={topk} must be in (0, 1) (the fraction of each tensor counted as top curvature)")
    inspector = Inspector(
        str(base),
        [str(e) for e in experts],
        density=density,
        topk=topk,
        bias_correction=bias_correction,
        resolver=resolver or _local_resolver,
        quiet=quiet,
    )
    try:
        inspector.find_thresholds()
        inspector.inspect()
        diag = inspector.result()
    finally:
        inspector.close()
    diag["findings"] = findings(diag)
    return diag


def write_diagnostics(diag: dict, out_dir: str | os.PathLike, *, plots: bool = True) -> list[Path]:
    """Write ``diagnostics.json``, the figures (unless ``plots=False``) and ``summary.md`` into ``out_dir``.

    Returns:
        The written paths.

    Raises:
        ImportError: ``plots=True`` and matplotlib is not installed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_diagnostics(diag, out) if plots else []
    (out / DIAGNOSTICS_FILE).write_text(json.dumps(diag, indent=1, allow_nan=False) + "\n")
    (out / SUMMARY_FILE).write_text(render_summary(diag, [f.name for f in figures]))
    return [out / DIAGNOSTICS_FILE, out / SUMMARY_FILE, *figures]
