"""The merge: a recipe (:mod:`.recipe`), its inputs opened and checked once (:mod:`.inputs`), the
methods (:mod:`.methods`, one file each), FFG's thresholds (:mod:`.thresholds`), the one runner
(:mod:`.runner`) and what a merge leaves beside the weights (:mod:`.report`). No PyTorch: a
backend (:mod:`ota_trainer.backends`) does the tensor work, PyTorch only when it is chosen."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..io.write import OutputDir, output_for
from .inputs import MergeInputs, open_inputs
from .recipe import MergeRecipe
from .report import MergeReport, Resolver, local_resolver

__all__ = ["merge", "as_recipe"]


def as_recipe(recipe: MergeRecipe | dict[str, Any] | str | os.PathLike) -> MergeRecipe:
    """A :class:`MergeRecipe` from itself, its dict form or a YAML file's path."""
    if isinstance(recipe, MergeRecipe):
        return recipe
    if isinstance(recipe, dict):
        return MergeRecipe.from_dict(recipe)
    return MergeRecipe.from_yaml(recipe)


def merge(
    recipe: MergeRecipe | dict[str, Any] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    resolver: Resolver | None = None,
    fast_path: bool = True,
    output: OutputDir | None = None,
    inputs: MergeInputs | None = None,
) -> MergeReport:
    """Merge experts as the recipe says and write a Hugging Face model folder to ``out_dir``.

    Args:
        recipe: a :class:`MergeRecipe`, its dict form, or a path to a YAML recipe.
        out_dir: output folder; written atomically (a temporary folder beside it is renamed).
        overwrite: replace ``out_dir`` if it exists and is not empty.
        quiet: no progress bars.
        resolver: turns a model reference into a local folder (default: the reference is a
            folder). The Hub layer passes one that downloads repo ids.
        fast_path: let the native kernels do the merge when they cover it (the same bytes,
            without PyTorch); False: always the PyTorch backend.
        output: the :class:`~ota_trainer.io.write.OutputDir`, when the caller has made it already
            (the CLI does, before anything else); it is then the caller's to release.
        inputs: the recipe's inputs as :func:`~ota_trainer.merger.inputs.open_inputs` opened them,
            when the caller has already.

    Returns:
        A :class:`MergeReport` (achieved FFG density per expert and per tensor, files, time),
        also written to ``<out_dir>/ota_merge_report.json``.

    Raises:
        ConfigError, FormatError, IncompatibleModelsError, MissingMomentsError, NumericalError,
        OutputExistsError, OutputError: nothing is left at ``out_dir`` when any is raised. An
        ``out_dir`` that is, contains or lies inside an input or the Hugging Face cache is
        refused before anything is read, even with ``overwrite``.

    Example:
        >>> report = merge({"method": "ota", "base_model": "base", "models": ["math", "code"],
        ...                 "parameters": {"density": 0.4}}, "merged")
        >>> [round(e.density, 3) for e in report.experts]
        [0.4, 0.4]
    """
    start = time.perf_counter()
    recipe = as_recipe(recipe)
    resolver = resolver or local_resolver
    if output is None:  # checks and locks out_dir before any input is read
        with output_for(recipe, out_dir, overwrite=overwrite, resolver=resolver) as output:
            return merge(
                recipe, out_dir, quiet=quiet, resolver=resolver, fast_path=fast_path, output=output, inputs=inputs
            )
    from .adapters import AdapterExperts
    from .runner import run

    # LoRA adapter experts merge as the full experts they stand for, written beside the output (removed after)
    out = Path(out_dir)
    adapters = AdapterExperts(resolver, recipe.base_model, out.parent / f".{out.name}.ota-adapters-{os.getpid()}")
    try:
        if inputs is None:
            inputs = open_inputs(recipe, adapters)
        if recipe.out_adapter_rank is not None and not adapters.modules:
            from ..errors import ConfigError

            raise ConfigError(
                "out_adapter_rank: no expert is a LoRA adapter; the output adapter holds the merged edit of the "
                "weights LoRA experts update"
            )
        return run(recipe, inputs, output, quiet=quiet, resolver=adapters, fast_path=fast_path, start=start)
    finally:
        adapters.cleanup()
