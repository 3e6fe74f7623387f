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

import gc
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from . import fastpath, prescan
from ..backends import native
from ..io import readahead
from ..backends.torch.ops import (
    Curvature,
    OTAAccumulator,
    dare_merge,
    fisher_merge,
    linear_merge,
    magnitude_cut,
    task_arithmetic_merge,
    ties_merge,
)
from ..io.checkpoint import ModelFolder
from .recipe import MergeRecipe
from ..errors import NumericalError, brief
from ..moments.format import MomentsReader, all_finite
from ..backends.torch.ffg import SaliencyHistogram, Score, Threshold, keep_mask, per_tensor_threshold
from .inputs import MergeInputs, check_compatible, check_moments, open_inputs  # noqa: F401 - check_*: part of this module's API
from ..io.layout import matrix_view
from .report import (  # noqa: F401 - RECIPE_FILE, REPORT_FILE, CARD_FILE: part of this module's API
    CARD_FILE, RECIPE_FILE, REPORT_FILE, ExpertReport, MergeReport, Resolver, copy_side_files, finish, local_resolver as _local_resolver,
)
from ..io.write import OutputDir, StreamingSafetensorsWriter, output_for, parse_size

logger = logging.getLogger(__name__)

__all__ = ["merge", "MergeReport", "ExpertReport", "RECIPE_FILE", "REPORT_FILE"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tensors are merged in row blocks of this many entries: the chain of element-wise operations
# then works on ~2 MB float32 temporaries that stay in cache and are reused by the allocator,
# instead of streaming whole-tensor temporaries through memory (measured ~3x faster).
BLOCK_ELEMENTS = 1 << 19



def _as_recipe(recipe: MergeRecipe | dict[str, Any] | str | os.PathLike) -> MergeRecipe:
    if isinstance(recipe, MergeRecipe):
        return recipe
    if isinstance(recipe, dict):
        return MergeRecipe.from_dict(recipe)
    return MergeRecipe.from_yaml(recipe)


def _check_finite(folder: ModelFolder, name: str) -> None:
    if not torch.isfinite(folder.get(name)).all():
        raise NumericalError(f"{folder.label}: tensor {name!r} holds NaN or Inf", tensor=name, model=folder.label)




def _row_blocks(m: int, n: int) -> list[slice]:
    """Row ranges of an (m, n) view holding about ``BLOCK_ELEMENTS`` entries each."""
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    return [slice(s, min(s + step, m)) for s in range(0, m, step)]


def _curvatures(moments: list, power: float, normalise: str) -> list[Curvature]:
    """Each expert's ``P = v**power`` for one tensor, from :meth:`_Engine._moment`'s results;
    uniform curvature for every expert when any of them lacks moments for it."""
    if any(mo is None for mo in moments):
        return [Curvature() for _ in moments]
    return [Curvature.rank1(*mo, power, normalise) if isinstance(mo, tuple) else Curvature.full(mo, power, normalise)
            for mo in moments]


# -- engine -------------------------------------------------------------------------------------
class _Engine:
    def __init__(self, recipe: MergeRecipe, inputs: MergeInputs, resolver: Resolver, quiet: bool):
        self.recipe = recipe
        self.resolver = resolver
        self.method = recipe.spec
        self.quiet = quiet
        self.params = recipe.method_parameters()
        self.model_params = [recipe.model_parameters(i) for i in range(len(recipe.models))]
        self.experts = [ModelFolder(e) for e in inputs.experts]
        self.base = ModelFolder(inputs.base) if inputs.base else None
        self.template = self.base or self.experts[0]
        self.names = self.template.names()
        self.float_names = list(inputs.float_names)
        self.grafting = recipe.grafting()
        self.moments: list[MomentsReader | None] = [
            None if m is None else MomentsReader(m, bias_correction=self.params["bias_correction"], model=e.label)
            for m, e in zip(inputs.moments, inputs.experts)
        ]
        self.reports = [
            ExpertReport(e.model, p.get("density") if self.grafting else None, None, saliency_share=p.get("saliency_share") if self.grafting else None,
                         grafted=self.grafting)
            for e, p in zip(recipe.models, self.model_params)
        ]
        self.thresholds: list[Threshold | None] = [None] * len(self.experts)
        self.tensor_density: dict[str, list[float]] = {}
        self._arena: torch.Tensor | None = None

    def _prefetch(self, names: list[str], folders: list[ModelFolder]) -> None:
        """Start the disk reads of the next tensor while this one is merged (page-cache hints only)."""
        for name in names:
            for f in folders:
                f.prefetch(name)
            for m in self.moments:
                if m is not None and name in m:
                    m.prefetch(name)

    def _raw(self, folder: ModelFolder, name: str) -> torch.Tensor:
        """One tensor as stored, in its (m, n) view: a read-only map of the file (the engine only reads it)."""
        return folder.view(name).reshape(matrix_view(self.template.tensors[name].shape))

    def _moment(self, i: int, name: str) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None:
        """Expert i's second moment of ``name``: rank-one factors ``(a, b)`` of its (m, n) view, the
        full (m, n) float32 ``v``, or None (no moments for it)."""
        mom = self.moments[i]
        if mom is None or name not in mom:
            return None
        ab = mom.rank1(name)
        if ab is not None:
            return ab
        return mom[name].reshape(matrix_view(self.template.tensors[name].shape)).contiguous()

    def _score(self, moment) -> Score | None:
        """FFG saliency of an expert's edits of one tensor, or None when FFG keeps it whole (no moments)."""
        if self.params["score"] == "magnitude":
            return Score("magnitude")
        if moment is None:
            return None
        return Score.rank1(*moment) if isinstance(moment, tuple) else Score("full", v=moment)

    def _native(self, name: str, folders: Sequence[ModelFolder], out_dtype: torch.dtype | None = None) -> bool:
        """Whether this tensor is merged by the native kernels (available, and its dtypes supported)."""
        dtypes = [f.tensors[name].dtype for f in folders] + ([out_dtype] if out_dtype is not None else [])
        return native.available() and native.supports(*dtypes)

    # pass 1 ------------------------------------------------------------------------------
    def _take_prescan(self, experts: list[int], hists: dict[int, SaliencyHistogram]) -> bool:
        """Fill the histograms from the merge CLI's early first pass (:mod:`.prescan`), if one ran
        on exactly these inputs; False when there is none."""
        if self.base is None:
            return False
        scan = prescan.take(self.base.path, [self.experts[i].path for i in experts],
                            score=self.params["score"], bias_correction=self.params["bias_correction"])
        if scan is None:
            return False
        for i, counts, total in zip(experts, scan.counts, scan.totals):
            hists[i].counts = torch.frombuffer(counts, dtype=torch.int64)
            hists[i].total = total
        logger.info("FFG thresholds: saliencies counted while PyTorch loaded")
        return True

    def _count_saliencies(self, experts: list[int], hists: dict[int, SaliencyHistogram], folders: list[ModelFolder]) -> None:
        """Pass 1: every expert's saliencies into its histogram, tensor by tensor."""
        counter = native.SaliencyCounter([hists[i] for i in experts]) if native.available() else None
        for k, name in enumerate(tqdm(self.float_names, desc="FFG thresholds", unit="tensor", disable=self.quiet)):
            self._prefetch(self.float_names[k + 1 : k + 2], [self.base] + folders)
            w0r = self._raw(self.base, name)
            tensors = [self._raw(f, name) for f in folders]
            scores = [self._score(self._moment(i, name)) for i in experts]
            if counter is not None and self._native(name, [self.base] + folders):
                counter.add(w0r, tensors, scores)
            else:
                for rows in _row_blocks(*w0r.shape):
                    w0 = w0r[rows].float()
                    for i, e, sc in zip(experts, tensors, scores):
                        if sc is not None:
                            hists[i].add(sc.block(torch.sub(e[rows], w0), rows))
            del w0r, tensors, scores
        if counter is not None:
            counter.flush()

    def find_thresholds(self) -> None:
        global_density = self.recipe.global_threshold_experts()
        for i, p in enumerate(self.model_params):
            if self.grafting and p.get("threshold") is not None:
                self.thresholds[i] = Threshold.absolute(p["threshold"])
                self.reports[i].threshold_log2 = self.thresholds[i].log2_value
        if not global_density:
            return
        hists = {i: SaliencyHistogram() for i in global_density}
        folders = [self.experts[i] for i in global_density]
        if not self._take_prescan(global_density, hists):
            self._count_saliencies(global_density, hists, folders)
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
        """The merged tensor ``name`` in the output dtype, computed block by block in float32."""
        m = self.method.name
        shape = self.template.tensors[name].shape
        weights = [p["weight"] for p in self.model_params]
        experts = [self._raw(e, name) for e in self.experts]
        if m == "ota":
            out, kept = self._ota(name, experts)
            if self.grafting:
                self._record_density(name, kept, out.numel())
            return out.reshape(shape)
        if m == "linear":
            def block(rows):
                return linear_merge([e[rows] for e in experts], weights)
        elif m == "fisher":
            curvs = _curvatures([self._moment(i, name) for i in range(len(experts))], 1.0, "none")

            def block(rows):
                ws = [e[rows].float() for e in experts]
                v = [c.weights(rows, 0.0) for c in curvs]  # None: uniform curvature
                v = [torch.ones_like(ws[0]) if x is None else x for x in v]
                return fisher_merge(ws, v, weights, self.params["epsilon"])
        else:
            w0r = self._raw(self.base, name)
            if m == "dare":  # one Bernoulli stream per tensor and expert: drawn for the whole tensor
                gens = [
                    torch.Generator().manual_seed((self.params["seed"] * 1_000_003 + zlib.crc32(name.encode()) * 31 + i) % 2**63)
                    for i in range(len(experts))
                ]
                w0 = w0r.float()
                deltas = [torch.sub(e, w0) for e in experts]
                merged = dare_merge(w0, deltas, weights, [p["drop_rate"] for p in self.model_params], self.params["lambda"], gens)
                return self._finish(name, merged).to(self.out_dtype(name)).reshape(shape)
            cuts = None
            densities = [p.get("density") for p in self.model_params]
            if m == "ties" and len(experts) <= native.MAX_TIES_EXPERTS and self._native(name, [self.base] + self.experts, self.out_dtype(name)):
                cuts = native.magnitude_cuts(w0r, experts, densities)
                out, finite = native.ties_merge(w0r, experts, cuts, weights, self.params["lambda"],
                                                out_dtype=self.out_dtype(name), out=self._out_buffer(name, w0r.shape))
                if not finite:
                    self.explain_non_finite(name)
                return out.reshape(shape)
            if m == "ties":  # trim thresholds are per whole tensor
                w0 = w0r.float()
                cuts = [magnitude_cut(torch.sub(e, w0), p["density"]) for e, p in zip(experts, self.model_params)]
                del w0

            def block(rows):
                w0 = w0r[rows].float()
                deltas = [torch.sub(e[rows], w0) for e in experts]
                if m == "task_arithmetic":
                    return task_arithmetic_merge(w0, deltas, weights, self.params["lambda"])
                if m == "ties":
                    return ties_merge(w0, deltas, weights, densities, self.params["lambda"], cuts=cuts)
                raise AssertionError(f"unhandled method {m!r}")
        return self._blockwise(name, experts[0].shape, block).reshape(shape)

    def _out_buffer(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        """Memory for output tensor ``name`` in its (m, n) view, reused from tensor to tensor (the
        writer copies each tensor out before the next is merged): no fresh pages per tensor."""
        dtype = self.out_dtype(name)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self._arena is None or self._arena.numel() < nbytes:
            self._arena = None  # free the old one first
            self._arena = torch.empty(nbytes, dtype=torch.uint8)
        return self._arena[:nbytes].view(dtype).view(shape)

    def _blockwise(self, name: str, shape: tuple[int, int], block: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """The (m, n) output tensor ``name`` from ``block(rows)`` (float32) row block by row block."""
        out = self._out_buffer(name, shape)
        for rows in _row_blocks(*shape):
            out[rows] = self._finish(name, block(rows))
        return out

    def _finish(self, name: str, merged: torch.Tensor) -> torch.Tensor:
        """``merged`` if finite; otherwise the input responsible is found and named (raises)."""
        if not all_finite(merged):
            self.explain_non_finite(name)
        return merged

    def _ota(self, name: str, experts: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """OTA (+ FFG) of one tensor in its (m, n) view, and the entries each expert's mask kept.

        Natively when possible, else block by block with PyTorch, one expert at a time (peak
        memory does not grow with the number of experts); both give the same bits."""
        w0r = self._raw(self.base, name)
        moments = [self._moment(i, name) for i in range(len(experts))]
        scores: list[Score | None] = [None] * len(experts)  # FFG: each expert's own moments
        if self.grafting:
            for i, (e, mo) in enumerate(zip(experts, moments)):
                sc, thr = self._score(mo), self.thresholds[i]
                if sc is not None and thr is None:  # per-tensor density (ablation): a threshold on the whole tensor
                    thr = per_tensor_threshold(sc.block(torch.sub(e, w0r.float()), slice(None)), self.model_params[i]["density"])
                if sc is not None and thr is not None and not thr.keeps_all:  # None: no evidence to prune
                    scores[i] = (sc, thr)
        p = self.params
        curvs = _curvatures(moments, p["power"], p["normalise"])
        coefs = [mp["weight"] for mp in self.model_params]
        if self._native(name, [self.base] + self.experts, self.out_dtype(name)):
            out, kept, finite = native.ota_merge(
                w0r, experts, [s[0] if s else None for s in scores], [s[1].value if s else 0.0 for s in scores],
                curvs, coefs, epsilon=p["epsilon"], out_dtype=self.out_dtype(name), out=self._out_buffer(name, w0r.shape),
            )
            if not finite:
                self.explain_non_finite(name)
            return out, kept
        kept = [0] * len(experts)

        def block(rows: slice) -> torch.Tensor:
            w0 = w0r[rows].float()
            acc = OTAAccumulator(w0, epsilon=p["epsilon"])
            for i, (e, c) in enumerate(zip(experts, curvs)):
                d = torch.sub(e[rows], w0)
                mask = keep_mask(scores[i][0].block(d, rows), scores[i][1]) if scores[i] else None
                kept[i] += int(torch.count_nonzero(mask)) if mask is not None else d.numel()
                acc.add(d, c.weights(rows, p["epsilon"]), mask, coefs[i])
                del d, mask
            return acc.result()

        return self._blockwise(name, w0r.shape, block), kept

    def _record_density(self, name: str, kept: list[int], numel: int) -> None:
        """FFG's kept counts of one whole tensor into the per-expert and per-tensor report."""
        for i, k in enumerate(kept):
            self.reports[i].kept += k
            self.reports[i].total += numel
        self.tensor_density[name] = [k / max(numel, 1) for k in kept]

    def explain_non_finite(self, name: str) -> None:
        """The merge of ``name`` is not finite: find the input responsible and raise."""
        for folder in ([self.base] if self.base else []) + self.experts:
            _check_finite(folder, name)
        largest = []  # every input is finite: which of them is large enough to overflow float32 arithmetic
        for folder in ([self.base] if self.base else []) + self.experts:
            largest.append((float(folder.get(name).abs().max()) if self.template.tensors[name].numel else 0.0,
                            f"{folder.label}'s weights"))
        for m, e in zip(self.moments, self.experts):
            if m is not None and name in m:
                v = m[name]  # raises NumericalError naming the file for NaN/Inf/negative moments
                largest.append((float(v.max()) if v.numel() else 0.0, f"{e.label}'s moments (x{m.scale:.3g} bias correction)"))
        value, who = max(largest)
        raise NumericalError(
            f"merged tensor {brief(name)} overflows float32 although every input is finite: the largest input value is "
            f"{value:.3g} ({who}); no trained model has values near float32's limit (3.4e38), so that input is damaged "
            f"(or the method's parameters, {brief(self.params)}, scale it past the limit)", tensor=name)

    def out_dtype(self, name: str) -> torch.dtype:
        info = self.template.tensors[name]
        if self.recipe.dtype and info.dtype.is_floating_point:
            return _TORCH_DTYPES[self.recipe.dtype]
        return info.dtype

    def run(self, tmp: Path) -> list[str]:
        # the disk reads every input in the order the passes need it, while they compute
        models = ([self.base] if self.base else []) + self.experts
        moments = [None] * (len(models) - len(self.experts)) + list(self.moments)
        readahead.start([f.files + ([m.path] if m is not None else []) for f, m in zip(models, moments)])
        self.find_thresholds()
        plan = [(n, self.template.tensors[n].shape, self.out_dtype(n)) for n in self.names]
        writer = StreamingSafetensorsWriter(
            tmp, plan, max_shard_bytes=parse_size(self.recipe.shard_size),
            metadata={"merged_by": f"ota_trainer {__version__}", "merge_method": self.method.name},
        )
        try:
            for k, name in enumerate(tqdm(self.names, desc=f"merge ({self.method.name})", unit="tensor", disable=self.quiet)):
                self._prefetch(self.names[k + 1 : k + 2], ([self.base] if self.base else []) + self.experts)
                info = self.template.tensors[name]
                if info.dtype.is_floating_point:
                    merged = self.merge_tensor(name)  # checked for NaN/Inf block by block
                else:
                    merged = self.template.get(name)  # integer buffers are copied from the base
                writer.write(name, merged.to(self.out_dtype(name)))
                del merged
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        files += copy_side_files(self.template.layout, tmp, self.recipe.dtype)
        return files



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
        fast_path: try :mod:`ota_trainer.merger.fastpath` first (the same merge without PyTorch, for
            the recipes it covers); False: always this engine.
        output: the :class:`~ota_trainer.io.write.OutputDir`, when the caller has made it already
            (the CLI does, before anything else); it is then the caller's to release.
        inputs: the recipe's inputs as :func:`~ota_trainer.merger.inputs.open_inputs` opened them, when
            the caller has already.

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
    recipe = _as_recipe(recipe)
    resolver = resolver or _local_resolver
    if output is None:  # checks and locks out_dir before any input is read
        with output_for(recipe, out_dir, overwrite=overwrite, resolver=resolver) as output:
            return merge(recipe, out_dir, quiet=quiet, resolver=resolver, fast_path=fast_path, output=output, inputs=inputs)
    if inputs is None:
        inputs = open_inputs(recipe, resolver)
    if fast_path:  # the native kernels without PyTorch, where they cover the recipe (same bytes)
        report = fastpath.merge(recipe, out_dir, quiet=quiet, resolver=resolver, output=output, inputs=inputs)
        if report is not None:
            return report
    engine = _Engine(recipe, inputs, resolver, quiet)
    with output.stage() as tmp:
        gc_was_on = gc.isenabled()
        gc.disable()  # the merge makes no reference cycles; collections would only rescan the heap
        try:
            files = engine.run(tmp)
        finally:
            if gc_was_on:
                gc.enable()
        report = finish(tmp, recipe, output.dest, engine.reports, engine.tensor_density, files, engine.resolver, start)
    return report
