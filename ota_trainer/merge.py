"""The streaming merge engine: plan -> (threshold pass) -> merge pass -> atomic write.

Memory holds the tensors of ONE parameter name at a time across base, experts and their
moments; weights are read lazily from safetensors and the output is streamed to disk.

Stages:
1. open every model lazily (headers only) and check they line up: architecture, tensor
   names, shapes, moments coverage; every error is raised before anything is written;
2. if FFG uses a global density: one pass over base + experts + moments accumulating a
   log-space saliency histogram per expert, giving each expert's threshold;
3. one pass per tensor name: read, graft, aggregate in float32, cast, write;
4. copy config/tokenizer files, write the recipe and a report, rename into place.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .aggregate import OTAAccumulator, dare_merge, fisher_merge, linear_merge, task_arithmetic_merge, ties_merge
from .checkpoint import SIDE_FILES, ModelFolder
from .config import MergeRecipe
from .errors import ConfigError, FormatError, IncompatibleModelsError, MissingMomentsError, NumericalError
from .format import MOMENTS_DIR, MomentsReader, has_moments, load_moments
from .graft import SaliencyHistogram, Threshold, keep_mask, log_saliency, per_tensor_threshold
from .write import AtomicOutputDir, StreamingSafetensorsWriter, parse_size, render_model_card

logger = logging.getLogger(__name__)

__all__ = ["merge", "MergeReport", "ExpertReport", "RECIPE_FILE", "REPORT_FILE"]

RECIPE_FILE = "ota_merge.yaml"
REPORT_FILE = "ota_merge_report.json"
CARD_FILE = "README.md"
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# A resolver turns a model reference from the recipe (folder or repo id) into a local folder.
Resolver = Callable[[str], Path]


@dataclass
class ExpertReport:
    """What FFG did to one expert."""

    model: str
    density_target: float | None
    threshold_log2: float | None
    kept: int = 0
    total: int = 0
    saliency_share: float | None = None
    grafted: bool = False  # FFG ran on this expert (density is then the achieved kept fraction)

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 1.0


@dataclass
class MergeReport:
    """Returned by :func:`merge` and written to ``ota_merge_report.json`` in the output."""

    method: str
    out_dir: str
    recipe: dict[str, Any]
    experts: list[ExpertReport]
    tensor_density: dict[str, list[float]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    sources: dict[str, str | None] = field(default_factory=dict)
    seconds: float = 0.0
    library_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for e, rep in zip(d["experts"], self.experts):
            e["density"] = rep.density
            if e["threshold_log2"] is not None and not math.isfinite(e["threshold_log2"]):
                e["threshold_log2"] = None  # keep-everything threshold; JSON has no -Infinity
        return d


def _local_resolver(ref: str) -> Path:
    p = Path(ref).expanduser()
    if not p.is_dir():
        raise FormatError(f"model {ref!r}: no such folder", path=str(p))
    return p


def _as_recipe(recipe: MergeRecipe | dict[str, Any] | str | os.PathLike) -> MergeRecipe:
    if isinstance(recipe, MergeRecipe):
        return recipe
    if isinstance(recipe, dict):
        return MergeRecipe.from_dict(recipe)
    return MergeRecipe.from_yaml(recipe)


# -- checks -------------------------------------------------------------------------------------
def check_compatible(template: ModelFolder, experts: Sequence[ModelFolder]) -> None:
    """Experts must have the template's architecture, tensor names and shapes.

    Raises:
        IncompatibleModelsError: naming the model and the first offending tensors.
    """
    arch = template.architectures
    for e in experts:
        if arch and e.architectures and e.architectures != arch:
            raise IncompatibleModelsError(
                f"{e.label}: architecture {e.architectures} differs from the base's {arch}", model=e.label
            )
        missing = [n for n in template.tensors if n not in e.tensors]
        if missing:
            raise IncompatibleModelsError(
                f"{e.label}: lacks {len(missing)} tensor(s) the base has, e.g. {missing[:3]}", tensor=missing[0], model=e.label
            )
        extra = [n for n in e.tensors if n not in template.tensors]
        if extra:
            raise IncompatibleModelsError(
                f"{e.label}: has {len(extra)} tensor(s) the base lacks, e.g. {extra[:3]} "
                "(was it saved with untied or extra weights?)",
                tensor=extra[0],
                model=e.label,
            )
        for n, info in template.tensors.items():
            shape = e.tensors[n].shape
            if shape != info.shape:
                hint = ""
                if len(shape) == 2 and shape[1:] == info.shape[1:] and ("embed" in n or "lm_head" in n):
                    hint = (
                        f" (the vocabulary was resized: {shape[0]} vs {info.shape[0]} rows; merge experts that "
                        "share the base's tokenizer, or resize the base's embeddings the same way first)"
                    )
                raise IncompatibleModelsError(
                    f"{e.label}: tensor {n!r} has shape {tuple(shape)}, the base has {tuple(info.shape)}{hint}",
                    tensor=n,
                    model=e.label,
                )


def _open_moments(folder: ModelFolder, *, bias_correction: bool, allow_missing: bool) -> MomentsReader | None:
    if not has_moments(folder.path):
        if allow_missing:
            logger.warning("%s: no second moments; uniform curvature is used for all its parameters", folder.label)
            return None
        raise MissingMomentsError(
            f"{folder.label}: no second moments ({MOMENTS_DIR}/moments.safetensors). Train the expert with "
            "ota_trainer.OTACallback to produce them, pass --allow-missing-moments to use uniform weights, "
            "or use a method that needs none (linear, task_arithmetic, ties, dare)",
            model=folder.label,
        )
    moments = load_moments(folder.path, bias_correction=bias_correction)
    moments.model = folder.label
    return moments


def check_moments(folder: ModelFolder, moments: MomentsReader, names: Sequence[str], *, allow_missing: bool) -> None:
    """Moments must be for this model (names and shapes) and cover every merged tensor.

    Raises:
        IncompatibleModelsError: moments name a tensor the model lacks, or shapes differ.
        MissingMomentsError: a merged tensor has no moments and ``allow_missing`` is false.
    """
    for n, shape in moments.shapes.items():
        if n not in folder.tensors:
            raise IncompatibleModelsError(
                f"{moments.path}: moments for {n!r}, which {folder.label} does not have: "
                "these moments were written for a different model",
                tensor=n,
                model=folder.label,
            )
        if tuple(shape) != folder.tensors[n].shape:
            raise IncompatibleModelsError(
                f"{moments.path}: moments for {n!r} have shape {tuple(shape)}, the weights {folder.tensors[n].shape}: "
                "these moments were written for a different model",
                tensor=n,
                model=folder.label,
            )
    missing = [n for n in names if n not in moments]
    if missing:
        if not allow_missing:
            raise MissingMomentsError(
                f"{moments.path}: no second moments for {len(missing)} tensor(s) of {folder.label}, e.g. {missing[:3]} "
                "(frozen during training?); pass --allow-missing-moments to use uniform curvature for them",
                tensor=missing[0],
                model=folder.label,
            )
        logger.warning("%s: no moments for %d tensor(s) (e.g. %s); uniform curvature used there", folder.label, len(missing), missing[:3])


def _read_float(folder: ModelFolder, name: str) -> torch.Tensor:
    """One tensor as float32 (private memory: the engine may edit it in place).

    Not checked for NaN/Inf here: every method propagates them into its result, which is
    checked; only then are the inputs searched for the culprit (see ``_Engine.explain``).
    """
    return folder.get(name).to(torch.float32)


def _check_finite(folder: ModelFolder, name: str) -> None:
    if not torch.isfinite(folder.get(name)).all():
        raise NumericalError(f"{folder.label}: tensor {name!r} holds NaN or Inf", tensor=name, model=folder.label)


# -- engine -------------------------------------------------------------------------------------
class _Engine:
    def __init__(self, recipe: MergeRecipe, resolver: Resolver, quiet: bool):
        self.recipe = recipe
        self.resolver = resolver
        self.method = recipe.spec
        self.quiet = quiet
        self.params = recipe.method_parameters()
        self.model_params = [recipe.model_parameters(i) for i in range(len(recipe.models))]
        self.experts = [ModelFolder(resolver(e.model), label=e.model) for e in recipe.models]
        self.base = ModelFolder(resolver(recipe.base_model), label=recipe.base_model) if recipe.base_model else None
        self.template = self.base or self.experts[0]
        check_compatible(self.template, self.experts if self.base else self.experts[1:])
        self.names = self.template.names()
        self.float_names = [n for n in self.names if self.template.tensors[n].dtype.is_floating_point]
        self.grafting = self.method.name == "ota" and self.params["graft"]
        self.moments: list[MomentsReader | None] = [None] * len(self.experts)
        if self.method.needs_moments:
            for i, e in enumerate(self.experts):
                self.moments[i] = _open_moments(
                    e, bias_correction=self.params["bias_correction"], allow_missing=recipe.allow_missing_moments
                )
                if self.moments[i] is not None:
                    check_moments(e, self.moments[i], self.float_names, allow_missing=recipe.allow_missing_moments)
        self.reports = [
            ExpertReport(e.model, p.get("density") if self.grafting else None, None, saliency_share=p.get("saliency_share") if self.grafting else None,
                         grafted=self.grafting)
            for e, p in zip(recipe.models, self.model_params)
        ]
        self.thresholds: list[Threshold | None] = [None] * len(self.experts)
        self.tensor_density: dict[str, list[float]] = {}

    def _v(self, i: int, name: str) -> torch.Tensor | None:
        m = self.moments[i]
        return m[name] if m is not None and name in m else None

    def _delta(self, i: int, name: str, w0: torch.Tensor) -> torch.Tensor:
        """``d = w_t - w0`` in float32, in one pass (the stored dtype is promoted as it is read)."""
        return torch.sub(self.experts[i].get(name), w0)

    def _log_saliency(self, i: int, name: str, delta: torch.Tensor, v: torch.Tensor | None = None,
                      factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """log2 saliency of expert i's edits, or None when FFG keeps the whole tensor (no moments).

        ``v`` (full) or ``factors`` (rank-one ``(a, b)``) are expert i's moment for ``name``
        when the caller has read it already.
        """
        score = self.params["score"]
        if score == "magnitude":
            return log_saliency(delta, None, score)
        if factors is None and v is None:
            m = self.moments[i]
            if m is None or name not in m:
                return None
            factors = m.rank1(name)
            if factors is None:
                return log_saliency(delta, None, score, log2_v=m.log2(name))
        if factors is not None:
            return log_saliency(delta, None, score, log2_factors=(torch.log2(factors[0]), torch.log2(factors[1])))
        return log_saliency(delta, v, score)

    # pass 1 ------------------------------------------------------------------------------
    def find_thresholds(self) -> None:
        global_density = [
            i for i, p in enumerate(self.model_params)
            if self.grafting and p.get("threshold") is None
            and (p.get("saliency_share") is not None or (p.get("density") is not None and not self.params["per_tensor"]))
        ]
        for i, p in enumerate(self.model_params):
            if self.grafting and p.get("threshold") is not None:
                self.thresholds[i] = Threshold.absolute(p["threshold"])
                self.reports[i].threshold_log2 = self.thresholds[i].log2_value
        if not global_density:
            return
        hists = {i: SaliencyHistogram() for i in global_density}
        for name in tqdm(self.float_names, desc="FFG thresholds", unit="tensor", disable=self.quiet):
            w0 = _read_float(self.base, name)
            for i in global_density:
                ls = self._log_saliency(i, name, self._delta(i, name, w0))
                if ls is not None:
                    hists[i].add(ls, consume=True)
            del w0
        for i, h in hists.items():
            p = self.model_params[i]
            share = p.get("saliency_share")
            self.thresholds[i] = h.threshold_for_share(share) if share is not None else h.threshold_for_density(p["density"])
            self.reports[i].threshold_log2 = self.thresholds[i].log2_value
            logger.info(
                "%s: FFG threshold log2(theta)=%.3f keeps %.4f of %d entries (%s)",
                self.experts[i].label, self.thresholds[i].log2_value, h.kept(self.thresholds[i]) / max(h.total, 1), h.total,
                f"saliency share {share}" if share is not None else f"target density {p['density']}",
            )

    # pass 2 ------------------------------------------------------------------------------
    def merge_tensor(self, name: str) -> torch.Tensor:
        m = self.method.name
        if m == "ota":
            return self.merge_ota(name)
        weights = [p["weight"] for p in self.model_params]
        experts = [_read_float(e, name) for e in self.experts]
        if m == "linear":
            return linear_merge(experts, weights)
        if m == "fisher":
            v = [self._v(i, name) for i in range(len(experts))]
            if any(x is None for x in v):
                v = [torch.ones_like(experts[0])] * len(experts)  # uniform curvature for this tensor
            return fisher_merge(experts, v, weights, self.params["epsilon"])
        w0 = _read_float(self.base, name)
        deltas = [w.sub_(w0) for w in experts]  # in place: experts become task vectors
        if m == "task_arithmetic":
            return task_arithmetic_merge(w0, deltas, weights, self.params["lambda"])
        if m == "ties":
            return ties_merge(w0, deltas, weights, [p["density"] for p in self.model_params], self.params["lambda"])
        if m == "dare":
            gens = [
                torch.Generator().manual_seed((self.params["seed"] * 1_000_003 + zlib.crc32(name.encode()) * 31 + i) % 2**63)
                for i in range(len(deltas))
            ]
            return dare_merge(w0, deltas, weights, [p["drop_rate"] for p in self.model_params], self.params["lambda"], gens)
        raise AssertionError(f"unhandled method {m!r}")

    def merge_ota(self, name: str) -> torch.Tensor:
        """OTA (+ FFG), one expert at a time: peak memory is a few tensors whatever the number of experts."""
        w0 = _read_float(self.base, name)
        # uniform curvature for every expert on this tensor if any expert lacks its moments
        uniform = not all(m is not None and name in m for m in self.moments)
        acc = OTAAccumulator(w0, power=self.params["power"], epsilon=self.params["epsilon"], normalise=self.params["normalise"])
        densities = []
        for i in range(len(self.experts)):
            d = self._delta(i, name, w0)
            v = factors = None
            if not uniform:  # rank-one moments stay factored: v**p and log2(v) come from the factors
                factors = self.moments[i].rank1(name)
                v = self.moments[i][name] if factors is None else None
            mask = None
            if self.grafting:
                ls = self._log_saliency(i, name, d, v, factors)
                if ls is not None:  # None: no moments for this tensor, no evidence to prune: keep every edit
                    thr = self.thresholds[i] if self.thresholds[i] is not None else per_tensor_threshold(ls, self.model_params[i]["density"])
                    mask = keep_mask(ls, thr)
                    del ls
                kept = int(mask.sum()) if mask is not None else w0.numel()
                self.reports[i].kept += kept
                self.reports[i].total += w0.numel()
                densities.append(kept / max(w0.numel(), 1))
            acc.add(d, v, mask, self.model_params[i]["weight"], factors=factors)
            del d, v, mask, factors
        if self.grafting:
            self.tensor_density[name] = densities
        return acc.result()

    def explain_non_finite(self, name: str) -> None:
        """The merge of ``name`` is not finite: find the input responsible and raise."""
        for folder in ([self.base] if self.base else []) + self.experts:
            _check_finite(folder, name)
        for m in self.moments:
            if m is not None and name in m:
                m[name]  # raises NumericalError naming the file for NaN/Inf/negative moments
        raise NumericalError(f"merged tensor {name!r} is not finite although its inputs are; check the method's parameters", tensor=name)

    def out_dtype(self, name: str) -> torch.dtype:
        info = self.template.tensors[name]
        if self.recipe.dtype and info.dtype.is_floating_point:
            return _TORCH_DTYPES[self.recipe.dtype]
        return info.dtype

    def run(self, tmp: Path) -> list[str]:
        self.find_thresholds()
        plan = [(n, self.template.tensors[n].shape, self.out_dtype(n)) for n in self.names]
        writer = StreamingSafetensorsWriter(
            tmp, plan, max_shard_bytes=parse_size(self.recipe.shard_size),
            metadata={"merged_by": f"ota_trainer {__version__}", "merge_method": self.method.name},
        )
        try:
            for name in tqdm(self.names, desc=f"merge ({self.method.name})", unit="tensor", disable=self.quiet):
                info = self.template.tensors[name]
                if info.dtype.is_floating_point:
                    merged = self.merge_tensor(name)
                    if not torch.isfinite(merged).all():
                        self.explain_non_finite(name)
                else:
                    merged = self.template.get(name)  # integer buffers are copied from the base
                writer.write(name, merged.to(self.out_dtype(name)))
                del merged
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        files += self._copy_side_files(tmp)
        return files

    def _copy_side_files(self, tmp: Path) -> list[str]:
        files = []
        src = self.template.path
        config = dict(self.template.config)
        if config:
            if self.recipe.dtype:
                for key in ("torch_dtype", "dtype"):
                    if key in config:
                        config[key] = self.recipe.dtype
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            files.append("config.json")
        for f in SIDE_FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
                files.append(f)
        return files


def merge(
    recipe: MergeRecipe | dict[str, Any] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    resolver: Resolver | None = None,
) -> MergeReport:
    """Merge experts as the recipe says and write a Hugging Face model folder to ``out_dir``.

    Args:
        recipe: a :class:`MergeRecipe`, its dict form, or a path to a YAML recipe.
        out_dir: output folder; written atomically (a temporary folder beside it is renamed).
        overwrite: replace ``out_dir`` if it exists and is not empty.
        quiet: no progress bars.
        resolver: turns a model reference into a local folder (default: the reference is a
            folder). The Hub layer passes one that downloads repo ids.

    Returns:
        A :class:`MergeReport` (achieved FFG density per expert and per tensor, files, time),
        also written to ``<out_dir>/ota_merge_report.json``.

    Raises:
        ConfigError, FormatError, IncompatibleModelsError, MissingMomentsError, NumericalError,
        OutputExistsError: nothing is left at ``out_dir`` when any is raised.

    Example:
        >>> report = merge({"method": "ota", "base_model": "base", "models": ["math", "code"],
        ...                 "parameters": {"density": 0.4}}, "merged")
        >>> [round(e.density, 3) for e in report.experts]
        [0.4, 0.4]
    """
    start = time.perf_counter()
    recipe = _as_recipe(recipe)
    out = AtomicOutputDir(out_dir, overwrite=overwrite)  # refuses a non-empty out_dir before any work
    engine = _Engine(recipe, resolver or _local_resolver, quiet)
    with out as tmp:
        files = engine.run(tmp)
        report = MergeReport(
            method=recipe.method,
            out_dir=str(out.dest),
            recipe=recipe.to_dict(),
            experts=engine.reports,
            tensor_density=engine.tensor_density,
            files=files + [RECIPE_FILE, REPORT_FILE, CARD_FILE],
        )
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
        sha = getattr(engine.resolver, "sha", None)
        refs = ([recipe.base_model] if recipe.base_model else []) + [m.model for m in recipe.models]
        sources = {r: (sha(r) if sha else None) for r in refs}
        report.sources = sources
        (tmp / CARD_FILE).write_text(render_model_card(report.to_dict(), sources))
        report.seconds = time.perf_counter() - start
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report
