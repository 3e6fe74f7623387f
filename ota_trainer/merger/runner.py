"""The one merge runner: inputs -> backend -> FFG thresholds -> merge pass -> one writer, one
report, one atomic output. No PyTorch here: the PyTorch backend is imported only when chosen.

1. The inputs arrive opened and checked (:func:`ota_trainer.merger.inputs.open_inputs`), so
   every backend reads validated layouts only.
2. A backend is chosen by what it covers, never by the method's name: the native kernels
   (:class:`~ota_trainer.backends.native.backend.NativeBackend`) when the method has a native
   implementation and the kernels read the dtypes and options, else PyTorch
   (:class:`~ota_trainer.backends.torch.TorchBackend`), which covers every recipe. One log line
   says which, and why.
3. A grafting method (FFG) needs each expert's global threshold before the first tensor can be
   merged: a histogram pass over all the expert's saliencies. The native kernels count it when
   they read the inputs; when PyTorch does the merge, they count it on a thread while PyTorch
   loads (the kernels release the GIL). A histogram counted before, of the same files (the
   cache, :mod:`.ffg_cache`), or shipped by the expert (:mod:`.ffg_shipped`) saves that pass;
   the merge pass then proves the threshold it gives (the entries kept at it, and with the
   native kernels at its neighbouring bin edges too; under the saliency-share rule, the masses
   above, in and below its bin: :func:`~ota_trainer.backends.thresholds.share_proved`) and, if
   that fails, the output is discarded and the merge redone from a fresh count.
4. Tensor by tensor (one parameter name at a time across base and experts), the backend merges
   into a reused buffer and the streaming writer appends the bytes to the output; integer
   buffers are copied from the base.
5. The base's config and tokenizer files, the recipe, the report and the model card complete
   the output, which replaces ``--out`` atomically (:class:`~ota_trainer.io.write.OutputDir`).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from typing import Any

from .. import __version__
from ..backends.native.backend import NativeBackend
from ..backends.thresholds import SCORES, Histogram, Threshold, bin_edge, share_proved, share_summation_depth
from ..errors import ConfigError
from ..io.layout import DTYPES, dtype_code, matrix_view
from ..io.write import OutputDir, StreamingSafetensorsWriter, parse_size
from . import ffg_cache
from .ffg_shipped import describe, histogram_domain
from .inputs import MergeInputs
from .recipe import MergeRecipe
from .report import ExpertReport, MergeReport, Resolver, copy_side_files, finish, resolve_chat_template

logger = logging.getLogger(__name__)

__all__ = ["run", "choose_backend", "count_histograms", "domain_description"]


def choose_backend(recipe: MergeRecipe, inputs: MergeInputs, *, fast_path: bool = True) -> tuple[Any, str | None]:
    """The backend class for this merge and why the native kernels were not chosen (None when they were)."""
    reason = NativeBackend.covers(recipe, inputs) if fast_path else "fast_path=False"
    if reason is None:
        return NativeBackend, None
    try:
        from ..backends.torch import TorchBackend
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        from .methods import METHODS

        native = [m.name for m in METHODS.values() if m.native is not None]
        raise ConfigError(
            f"this merge needs PyTorch (the native kernels do not cover it: {reason}), and PyTorch is not installed: "
            f"pip install torch (without it, the native kernels run {' and '.join(native)} recipes they cover)"
        ) from None
    return TorchBackend, reason


def run(
    recipe: MergeRecipe,
    inputs: MergeInputs,
    output: OutputDir,
    *,
    quiet: bool = False,
    resolver: Resolver,
    fast_path: bool = True,
    start: float | None = None,
) -> MergeReport:
    """Merge ``inputs`` as ``recipe`` says into ``output`` (see the module docstring).

    Raises:
        NumericalError, OutputError: a merged tensor is not finite (naming the input responsible),
            or the output cannot be written; nothing is left at the output then.
    """
    start = time.perf_counter() if start is None else start
    try:
        return _run(recipe, inputs, output, quiet, resolver, fast_path, start, cached=True)
    except ffg_cache.StaleHistogram as e:
        logger.warning("%s: merging again from a fresh count of the saliencies", e)
        for key in e.keys:
            ffg_cache.forget(key)
        return _run(recipe, inputs, output, quiet, resolver, fast_path, start, cached=False)


def _run(recipe, inputs, output, quiet, resolver, fast_path, start, cached: bool) -> MergeReport:
    """:func:`run`; ``cached``: FFG histograms may come from the cache (when on) or the experts
    (else counted, and cached)."""
    model_params = [recipe.model_parameters(i) for i in range(len(recipe.models))]
    grafting = recipe.grafting()
    reports = [
        ExpertReport(
            m.model,
            p.get("density") if grafting else None,
            None,
            saliency_share=p.get("saliency_share") if grafting else None,
            grafted=grafting and not _ungraftable(recipe, inputs, i),
            no_moments=grafting and _ungraftable(recipe, inputs, i),
        )
        for i, (m, p) in enumerate(zip(recipe.models, model_params))
    ]
    # a LoRA adapter edits only its adapted weights: FFG's density and the report count those alone
    edited = getattr(resolver, "edited", {})
    scopes = [edited.get(m.model) for m in recipe.models]
    gc_was_on = gc.isenabled()
    gc.disable()  # the merge makes no reference cycles; collections would only rescan the heap
    backend = None
    try:
        backend, thresholds, predicted = _start(recipe, inputs, quiet, fast_path, scopes, cached)
        for report, threshold in zip(reports, thresholds):
            if threshold is not None:
                report.threshold_log2 = threshold.log2_value
        checks = {i: p.checks[:2] for i, p in predicted.items() if p.checks is not None}
        share_checks = {
            i: (bin_edge(thresholds[i].bin), bin_edge(thresholds[i].bin + 1))
            for i, p in predicted.items()
            if p.share is not None
        }
        if checks or share_checks:
            backend.set_thresholds(thresholds, checks, share_checks)
        else:
            backend.set_thresholds(thresholds)
        with output.stage() as tmp:
            files, tensor_density = _merge_pass(recipe, inputs, backend, tmp, reports, quiet, scopes, predicted)
            chat = resolve_chat_template(recipe.chat_template, inputs)
            files += copy_side_files(inputs.template, tmp, recipe.dtype, chat_template=chat)
            adapter = None
            if recipe.out_adapter_rank is not None:  # the merged edit as a LoRA adapter (PyTorch's SVD)
                from .adapters import export_adapter

                written, adapter = export_adapter(
                    tmp, inputs.base, resolver.modules, recipe.out_adapter_rank, recipe.base_model
                )
                files += written
                _log_adapter(adapter, full_experts=any(scope is None for scope in scopes))
            return finish(tmp, recipe, output.dest, reports, tensor_density, files, resolver, start, inputs, adapter)
    finally:
        if backend is not None:
            backend.close()
        if gc_was_on:
            gc.enable()


def _log_adapter(adapter: dict[str, Any], full_experts: bool) -> None:
    worst = max(adapter["modules"].items(), key=lambda kv: kv[1]["rel_error"])
    logger.info(
        "LoRA adapter of the merged edit (rank %d, %d modules) in %s/: relative error %.4f overall, at most %.4f (%s)",
        adapter["rank"],
        len(adapter["modules"]),
        adapter["path"],
        adapter["rel_error"],
        worst[1]["rel_error"],
        worst[0],
    )
    if full_experts:
        logger.warning(
            "the output adapter holds the merged edit of the weights the LoRA experts update; the full fine-tuned "
            "experts' edits of other weights are in the merged model only"
        )


def _ungraftable(recipe: MergeRecipe, inputs: MergeInputs, i: int) -> bool:
    """Expert ``i`` has no moments (allowed missing) and FFG's saliency needs them: its edits are all kept."""
    return inputs.moments[i] is None and recipe.model_parameters(i).get("score") != "magnitude"


def _domain(recipe: MergeRecipe, inputs: MergeInputs, i: int) -> list[str]:
    """The tensors whose saliencies expert ``i``'s FFG histogram counts (those with moments, or
    every float tensor for the magnitude score)."""
    moments, score = inputs.moments[i], recipe.method_parameters().get("score") or SCORES[0]
    return histogram_domain(inputs.float_names, () if moments is None else moments.stored, score)


def _saliency(recipe: MergeRecipe, inputs: MergeInputs, i: int) -> tuple[str, float | None]:
    """Expert ``i``'s FFG saliency in this merge: its score, and the scale its moments are read
    with (None for the magnitude score, which reads no moments)."""
    params = recipe.method_parameters()
    score = params.get("score") or SCORES[0]
    return score, None if score == "magnitude" else inputs.moments[i].scale(params.get("bias_correction", True))


def _histogram_key(recipe: MergeRecipe, inputs: MergeInputs, i: int) -> str | None:
    score, scale = _saliency(recipe, inputs, i)
    names = inputs.float_names
    files = [inputs.base.file(n) for n in names] + [inputs.experts[i].file(n) for n in names]
    if scale is not None:
        files.append(inputs.moments[i].path)
    return ffg_cache.histogram_key(files, names, score, scale)


def domain_description(recipe: MergeRecipe, inputs: MergeInputs, i: int) -> dict[str, str]:
    """What expert ``i``'s FFG histogram is a histogram of, in this merge (:func:`.ffg_shipped.describe`)."""
    names = _domain(recipe, inputs, i)
    total = sum(math.prod(inputs.template.tensors[n].shape) for n in names)
    return describe(*_saliency(recipe, inputs, i), names, total)


def count_histograms(recipe: MergeRecipe, inputs: MergeInputs, experts: list[int], *, quiet: bool = True):
    """The FFG saliency histograms of ``experts``, counted by the native kernels where they cover
    them, else by PyTorch."""
    if NativeBackend.covers_histograms(recipe, inputs, experts) is None:
        cls = NativeBackend
    else:
        from ..backends.torch import TorchBackend as cls
    backend = cls(recipe, inputs, quiet=quiet)
    try:
        backend.start_reads()
        return backend.histograms(experts, inputs.float_names)
    finally:
        backend.close()


class Prediction:
    """What a histogram this merge did not count (``source``: its cache key, or None when the
    expert shipped it) predicts the merge pass will count for its expert: the entries ``kept``
    at the threshold and, where the kernels can prove it (:meth:`Histogram.checks`), ``checks``
    = (lo, hi, kept at lo, kept at hi); or, under the saliency-share rule, ``share`` = (the
    share, the most additions a term of the pass's sums goes through): the merge pass adds up
    the masses above, in and below the threshold's bin, and :func:`share_proved` shows a fresh
    count would pick the same bin (the kept entries may then differ: the threshold, and so every
    byte, is a fresh count's)."""

    def __init__(
        self,
        source: str | None,
        kept: int,
        checks: tuple[float, float, int, int] | None,
        share: tuple[float, int] | None = None,
    ):
        self.source, self.kept, self.checks, self.share = source, kept, checks, share

    def holds(self, kept: int, checked: list[int] | None, masses: list[float] | None = None) -> bool:
        if self.share is not None:
            return masses is not None and share_proved(self.share[0], masses, self.share[1])
        return kept == self.kept and (self.checks is None or list(checked or ()) == list(self.checks[2:]))


def _threshold(hist: Histogram, p: dict[str, Any]) -> tuple[Threshold, int]:
    """An expert's FFG threshold from its histogram and its parameters, and the entries it keeps."""
    share = p.get("saliency_share")
    return hist.share_threshold(share) if share is not None else hist.density_threshold(p["density"])


def _shipped(recipe: MergeRecipe, inputs: MergeInputs, todo: list[int], scopes: list) -> dict[int, Histogram]:
    """The experts' shipped histograms this merge can use and prove: those describing its
    saliency, under a density rule whose threshold :meth:`Histogram.checks` can prove, or the
    saliency-share rule (:func:`share_proved`) at a threshold that keeps less than everything."""
    out: dict[int, Histogram] = {}
    for i in todo:
        s = inputs.shipped[i] if i < len(inputs.shipped) else None
        p = recipe.model_parameters(i)
        if s is None or scopes[i] is not None:
            continue
        want = domain_description(recipe, inputs, i)
        if s.describes != want:
            differ = [k for k in want if s.describes.get(k) != want[k]]
            logger.info(
                "%s: its shipped FFG histogram is of another saliency (%s): counted",
                inputs.experts[i].label,
                ", ".join(differ),
            )
            continue
        threshold, _ = _threshold(s.histogram, p)
        if threshold.keeps_all or (p.get("saliency_share") is None and s.histogram.checks(threshold) is None):
            logger.info(
                "%s: its shipped FFG histogram gives a threshold that cannot be proved: counted",
                inputs.experts[i].label,
            )
            continue
        out[i] = s.histogram
    return out


def _count(backend: Any, need: list[int], names: list[str], scopes: list) -> list[Histogram]:
    """The FFG histograms of experts ``need``, one pass per set of weights they edit: an expert
    with a scope (a LoRA adapter's adapted weights) is counted over those alone; its other
    weights are the base's (saliency 0, no edit for a density to count), so they are not read."""
    groups: dict[frozenset[str] | None, list[int]] = {}
    for i in need:
        groups.setdefault(scopes[i], []).append(i)
    out: dict[int, Histogram] = {}
    for scope, group in groups.items():
        counted = backend.histograms(group, names if scope is None else [n for n in names if n in scope])
        out.update(zip(group, counted))
    return [out[i] for i in need]


def _start(recipe: MergeRecipe, inputs: MergeInputs, quiet: bool, fast_path: bool, scopes: list, cached: bool):
    """The merge backend, started, every expert's FFG threshold (None: per tensor, or none), and,
    for the histograms this merge did not count, what the merge pass must find ({expert:
    :class:`Prediction`}). ``scopes``: per expert, the weights it edits (None: all); the density
    counts those alone. ``cached``: histograms may come from the cache or the experts (those
    counted are cached either way)."""
    cls, reason = choose_backend(recipe, inputs, fast_path=fast_path)
    if reason is None:
        logger.info("merging with the native kernels (no PyTorch)")
    else:
        logger.info("merging with PyTorch (the native kernels do not cover this: %s)", reason)
    model_params = [recipe.model_parameters(i) for i in range(len(recipe.models))]
    thresholds: list[Threshold | None] = [None] * len(inputs.experts)
    if recipe.grafting():
        for i, p in enumerate(model_params):
            if p.get("threshold") is not None:
                thresholds[i] = Threshold.absolute(p["threshold"])
    todo = [i for i in recipe.global_threshold_experts() if not _ungraftable(recipe, inputs, i)]
    for i in recipe.global_threshold_experts():
        if i not in todo:
            logger.info("%s: no moments: FFG is not applied, every edit is kept", inputs.experts[i].label)
    # (a LoRA adapter's expert is materialised afresh beside the output for each merge: not cached)
    keys = {i: _histogram_key(recipe, inputs, i) for i in todo if scopes[i] is None} if ffg_cache.enabled() else {}
    hists: dict[int, Histogram] = {}
    shipped: set[int] = set()
    provable = cls is NativeBackend and NativeBackend.checks_thresholds(recipe)
    if cached:
        for i, key in keys.items():
            hist = ffg_cache.load(key) if key is not None else None
            if hist is not None:
                hists[i] = hist
                logger.info("%s: FFG histogram from the cache (%s)", inputs.experts[i].label, key)
        if provable:  # a shipped histogram is used only where the merge pass can prove it
            for i, hist in _shipped(recipe, inputs, [i for i in todo if i not in hists], scopes).items():
                hists[i] = hist
                shipped.add(i)
                logger.info(
                    "%s: FFG histogram shipped with the expert (%s)", inputs.experts[i].label, inputs.shipped[i].path
                )
    taken = set(hists)
    need = [i for i in todo if i not in hists]
    counted: list[Histogram] = []
    if cls is NativeBackend:
        backend = NativeBackend(recipe, inputs, quiet=quiet)
        backend.start_reads()
        if need:
            counted = _count(backend, need, inputs.float_names, scopes)
    else:
        counter = thread = None
        failed: list[BaseException] = []
        if need and fast_path and NativeBackend.covers_histograms(recipe, inputs, need) is None:
            # the native kernels count FFG's histograms (GIL released) while PyTorch loads
            counter = NativeBackend(recipe, inputs, quiet=True)
            counter.start_reads()

            def count() -> None:
                try:
                    counted.extend(_count(counter, need, inputs.float_names, scopes))
                except BaseException as e:  # noqa: BLE001 - raised in the merge's own thread below
                    failed.append(e)

            thread = threading.Thread(target=count, name="ota-ffg-pass", daemon=True)
            thread.start()
        try:
            backend = cls(recipe, inputs, quiet=quiet)
            backend.start_reads()
        finally:
            if thread is not None:
                thread.join()
                counter.close()
        if failed:
            raise failed[0]
        if counter is not None:
            logger.info("FFG thresholds: saliencies counted by the native kernels while PyTorch loaded")
        elif need:
            counted = _count(backend, need, inputs.float_names, scopes)
    for i, hist in zip(need, counted):
        hists[i] = hist
        if keys.get(i) is not None:
            ffg_cache.store(keys[i], hist)
    predicted: dict[int, Prediction] = {}
    for i in todo:
        hist = hists[i]
        p = model_params[i]
        thresholds[i], kept = _threshold(hist, p)
        share = p.get("saliency_share")
        if i in taken:  # (histograms not counted here are of experts that edit every weight)
            proof = hist.checks(thresholds[i]) if provable and share is None else None
            by_mass = None
            if i in shipped and share is not None:
                views = [matrix_view(inputs.template.tensors[n].shape) for n in _domain(recipe, inputs, i)]
                by_mass = (share, share_summation_depth(views, backend.threads))
            predicted[i] = Prediction(None if i in shipped else keys.get(i), kept, proof, by_mass)
        logger.info(
            "%s: FFG threshold log2(theta)=%.3f keeps %.4f of %d entries (%s)",
            inputs.experts[i].label,
            thresholds[i].log2_value,
            kept / max(hist.total, 1),
            hist.total,
            f"saliency share {share}" if share is not None else f"target density {p['density']}",
        )
    return backend, thresholds, predicted


def _merge_pass(
    recipe: MergeRecipe,
    inputs: MergeInputs,
    backend,
    tmp,
    reports: list[ExpertReport],
    quiet: bool,
    scopes: list,
    predicted: dict[int, Prediction],
) -> tuple[list[str], dict[str, list[float]]]:
    """Every tensor merged (or copied) and written, in the template's on-disk order.

    Raises:
        ffg_cache.StaleHistogram: an expert's entries kept differ from what its cached histogram
            predicted, or the entries kept at its check cuts differ (``predicted``: {expert:
            :class:`Prediction`}); the output is then discarded."""
    template = inputs.template
    floats = set(inputs.float_names)

    def out_code(name: str) -> str:
        stored = template.tensors[name].dtype
        return dtype_code(recipe.dtype) if recipe.dtype and DTYPES[stored].floating else stored

    names = template.names
    writer = StreamingSafetensorsWriter(
        tmp,
        [(n, template.tensors[n].shape, out_code(n)) for n in names],
        max_shard_bytes=parse_size(recipe.shard_size),
        metadata={"merged_by": f"ota_trainer {__version__}", "merge_method": recipe.method},
    )
    tensor_density: dict[str, list[float]] = {}
    domains = {i: set(_domain(recipe, inputs, i)) for i in predicted}
    seen = dict.fromkeys(predicted, 0)  # entries kept in each histogram's tensors
    try:
        for k, name in enumerate(_progress(names, f"merge ({recipe.method})", quiet)):
            t = template.tensors[name]
            code = out_code(name)
            dest = None
            if name in floats:
                dest = writer.reserve(name, t.shape, code)  # room in the writer's staging memory, if it fits
                data, kept = backend.merge_tensor(name, names[k + 1 : k + 2], out=dest)
                if kept is not None and any(r.grafted for r in reports):
                    numel = math.prod(t.shape)
                    for report, n_kept, scope in zip(reports, kept, scopes):
                        if scope is None or name in scope:  # (an adapter keeps nothing elsewhere: no edit)
                            report.kept += n_kept
                            report.total += numel
                    tensor_density[name] = [n_kept / max(numel, 1) for n_kept in kept]
                for i in predicted:
                    seen[i] += kept[i] if name in domains[i] else 0
            else:
                data = backend.raw_bytes(name)  # integer buffers: the base's bytes
            if dest is not None and data is dest:
                writer.commit(name, t.shape, code)
            else:
                writer.write_bytes(name, t.shape, code, data)
            del data, dest
            backend.release(name)
        checked, masses = getattr(backend, "checked", None), getattr(backend, "masses", None)
        stale = [
            i
            for i in predicted
            if not predicted[i].holds(seen[i], checked[i] if checked else None, masses[i] if masses else None)
        ]
        if stale:

            def told(i: int) -> str:
                p, where = predicted[i], "cached" if predicted[i].source else "shipped"
                at = f" (and {p.checks[2]}, {p.checks[3]} at its neighbouring bin edges)" if p.checks else ""
                got = f" ({checked[i][0]}, {checked[i][1]})" if p.checks else ""
                if p.share is not None:
                    at = f" (a saliency share {p.share[0]} threshold its masses prove)"
                    got = " (masses above, at and below its bin: {:.6g}, {:.6g}, {:.6g}, which do not prove it)".format(
                        *masses[i]
                    )
                return (
                    f"{inputs.experts[i].label}: the {where} FFG histogram predicted {p.kept} entries kept{at}, "
                    f"the merge kept {seen[i]}{got}"
                )

            raise ffg_cache.StaleHistogram(
                "; ".join(told(i) for i in stale), [predicted[i].source for i in stale if predicted[i].source]
            )
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    return files, tensor_density


def _progress(names: list[str], desc: str, quiet: bool):
    if quiet:
        return names
    from tqdm.auto import tqdm

    return tqdm(names, desc=desc, unit="tensor")
