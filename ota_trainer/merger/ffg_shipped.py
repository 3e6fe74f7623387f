"""An expert's FFG saliency histogram, shipped beside its moments (``ota/ffg_histogram.safetensors``).

A global FFG threshold needs the histogram of all an expert's saliencies before the first entry
is merged: a full pass over base, expert and moments that a *first* merge cannot take from the
cache (:mod:`.ffg_cache`). The expert knows it already: :func:`save_ffg_histogram` counts it once,
after the final save, with the merger's own kernels (``train_sft`` does, and ``push_expert``
uploads it with the weights and moments, in the same commit), and a first merge then reads the
inputs once.

Hostile until proved, like every input, and never trusted for the output's bytes:

- **Validated when opened** (:func:`open_shipped`, from :func:`~ota_trainer.merger.inputs.open_inputs`):
  confined to the expert's folder, the safetensors header checked by the one validator, exactly
  two int64 tensors ``bins`` and ``counts``, bins increasing and in range, counts positive and
  adding up to the stated total. A file that fails is ignored with a warning naming it: the merge
  counts afresh (the histogram only saves time).
- **Used only where it describes this merge's saliency:** the same score, the same
  bias-correction scale of the moments, the same tensors (a hash of their names) and as many
  entries as they hold.
- **Proved by the merge pass:** under a density rule the kernels count the entries kept at the
  threshold it gives and at the two neighbouring bin edges
  (:meth:`~ota_trainer.backends.thresholds.Histogram.checks`): equal counts prove that a fresh
  count would have picked the same threshold. Under the saliency-share rule, whose threshold
  depends on every bin's mass, they add up the masses above, in and below the threshold's bin,
  and :func:`~ota_trainer.backends.thresholds.share_proved` shows, with both float64 roundings
  bounded, that a fresh count would pick that bin. If the proof fails (a stale file from an
  earlier run, another base, a lie) the output is discarded and the merge redone from a fresh
  count, with a warning. So the histogram can cost a merge pass, never a wrong byte. Where no
  proof is possible (the PyTorch backend, keep-everything, a density threshold next to an empty
  bin) the histogram is not used.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..backends.thresholds import BIN_SHIFT, N_BINS, SCORES, Histogram
from ..errors import FormatError
from ..io.folders import ModelLayout
from ..io.layout import (
    FFG_HISTOGRAM_FILE,
    MOMENTS_DIR,
    confined_file,
    ffg_histogram_path,
    read_safetensors_layout,
    remove_dead_leftovers,
    safetensors_header,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ShippedHistogram",
    "WeightsHeldElsewhere",
    "describe",
    "histogram_domain",
    "open_shipped",
    "resolve_base",
    "save_ffg_histogram",
    "ship_histogram_of_weights",
]

FORMAT = "ota_trainer.ffg_histogram"
FORMAT_VERSION = "1"
_KEYS = ("score", "scale", "names_sha256", "total", "bin_shift")  # what a histogram is a histogram of
MAX_TOTAL = 1 << 62


class WeightsHeldElsewhere(ValueError):
    """A tensor the moments hold is not among the weights in memory: the model holds them in
    another layout than it saves (e.g. MoE experts fused in memory, saved one by one), so the
    histogram is counted from the saved files instead (:func:`save_ffg_histogram`)."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class ShippedHistogram:
    """A validated shipped histogram: where it is, the histogram, and what it describes."""

    path: Path
    histogram: Histogram
    describes: dict[str, str]


def describe(score: str, scale: float | None, names: list[str], total: int) -> dict[str, str]:
    """What a histogram is a histogram of: the saliency's score and the moments' scale (``None``
    for the magnitude score), the tensors counted and their entries, the bins."""
    return {
        "score": score,
        "scale": "none" if scale is None else float(scale).hex(),
        "names_sha256": hashlib.sha256("\0".join(sorted(names)).encode()).hexdigest(),
        "total": str(total),
        "bin_shift": str(BIN_SHIFT),
    }


def histogram_domain(float_names: list[str], moments, score: str) -> list[str]:
    """The tensors an expert's FFG histogram counts: of the floating tensors ``float_names``, those
    its moments hold (any container of names), or every one for the magnitude score."""
    return list(float_names) if score == "magnitude" else [n for n in float_names if n in moments]


def _invalid(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: {why}")


def _read(path: Path) -> ShippedHistogram:
    """The histogram file at ``path``, validated whole.

    Raises:
        FormatError, ValueError: naming the file."""
    header, start = read_safetensors_layout(path)  # offsets, dtypes and shapes checked here
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise _invalid(path, f"not an FFG histogram of format {FORMAT} version {FORMAT_VERSION}")
    if any(not isinstance(meta.get(k), str) for k in _KEYS):
        raise _invalid(path, f"metadata lacks {', '.join(k for k in _KEYS if not isinstance(meta.get(k), str))}")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if sorted(tensors) != ["bins", "counts"] or any(
        v["dtype"] != "I64" or len(v["shape"]) != 1 for v in tensors.values()
    ):
        raise _invalid(path, "expected exactly two one-dimensional int64 tensors, bins and counts")
    n = tensors["bins"]["shape"][0]
    if tensors["counts"]["shape"][0] != n or n > N_BINS:
        raise _invalid(path, f"{n} bins for {tensors['counts']['shape'][0]} counts (at most {N_BINS})")
    total = meta["total"]
    if not (total.isascii() and total.isdigit()) or int(total) > MAX_TOTAL:
        raise _invalid(path, f"total {total[:40]!r} is not a count")
    parts = {}
    with open(path, "rb") as f:
        for key in ("bins", "counts"):
            b, e = tensors[key]["data_offsets"]
            f.seek(start + b)
            a = array("q")
            a.frombytes(f.read(e - b))
            if sys.byteorder != "little":
                a.byteswap()
            parts[key] = a.tolist()
    hist = Histogram.validated(parts["bins"], parts["counts"], int(total), str(path))
    return ShippedHistogram(path, hist, {k: meta[k] for k in _KEYS})


def open_shipped(model: ModelLayout) -> ShippedHistogram | None:
    """The histogram an expert folder ships, validated; None when it has none or it is not valid
    (then with a warning naming the file: the merge counts the saliencies itself)."""
    rel = f"{MOMENTS_DIR}/{FFG_HISTOGRAM_FILE}"
    try:
        real = confined_file(model.path, rel, model.label)
        return None if real is None else _read(real)
    except (FormatError, ValueError, OSError) as e:
        logger.warning(
            "%s: ignoring its FFG histogram %s (the saliencies are counted instead): %s", model.label, rel, e
        )
        return None


def write_histogram(
    folder: str | os.PathLike, hist: Histogram, describes: dict[str, str], meta: dict[str, str]
) -> Path:
    """Write ``<folder>/ota/ffg_histogram.safetensors`` atomically, as the moments are written
    (``<name>.tmp-<PID>`` renamed over it; what a killed writer left is removed first)."""
    bins, counts = array("q", hist.bins), array("q", hist.counts)
    if sys.byteorder != "little":
        bins.byteswap()
        counts.byteswap()
    n = 8 * len(hist.bins)
    head = safetensors_header(
        [("bins", [len(hist.bins)], "I64", 0, n), ("counts", [len(hist.bins)], "I64", n, 2 * n)],
        {"format": FORMAT, "format_version": FORMAT_VERSION, **describes, **meta},
    )
    dest = ffg_histogram_path(folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(dest)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(head + bins.tobytes() + counts.tobytes())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def save_ffg_histogram(
    expert: str | os.PathLike,
    base: str | os.PathLike,
    *,
    score: str = SCORES[0],
    bias_correction: bool = True,
    quiet: bool = True,
) -> Path:
    """Count an expert's FFG saliency histogram against ``base`` and ship it beside its moments.

    Call it after the expert's final weights and moments are saved (``scripts/train_sft.py`` does,
    after ``trainer.save_model()``); :func:`~ota_trainer.hub.push_expert` uploads it with them. A
    first merge of the expert then skips FFG's histogram pass (see the module docstring: the merge
    proves the threshold it gives, so a stale file costs time, never bytes). It describes the
    default saliency (``score``, ``bias_correction``); merges with other settings count their own.

    Args:
        expert: the expert's folder (weights and ``ota/moments.safetensors``).
        base: the base model's folder it was fine-tuned from.

    Returns:
        The path written, ``<expert>/ota/ffg_histogram.safetensors``.

    Raises:
        FormatError, IncompatibleModelsError, MissingMomentsError: the expert or base is not valid.
    """
    from .inputs import open_inputs
    from .recipe import MergeRecipe
    from .report import local_resolver
    from .runner import count_histograms, domain_description

    recipe = MergeRecipe.from_dict(
        {
            "method": "ota",
            "base_model": str(base),
            "models": [str(expert)],
            "parameters": {"score": score, "bias_correction": bias_correction},
        }
    )
    inputs = open_inputs(recipe, local_resolver)
    (hist,) = count_histograms(recipe, inputs, [0], quiet=quiet)
    return _ship(inputs.experts[0].path, hist, domain_description(recipe, inputs, 0), inputs.moments[0].metadata, base)


def _ship(folder: Path, hist: Histogram, describes: dict[str, str], moments_meta: dict, base) -> Path:
    """Write an expert's counted histogram (:func:`write_histogram`) and say so."""
    # the base as the moments name it (a repo id), else the folder's name: no local path is shipped
    meta = {"base_model": str(moments_meta.get("base_model") or Path(base).name)}
    written = write_histogram(folder, hist, describes, meta)
    logger.info("%s: FFG histogram of %d entries (%d bins) written to %s", folder, hist.total, len(hist.bins), written)
    return written


def resolve_base(base: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of the base an expert was fine-tuned from: ``base`` itself when it is a
    folder, else a repo id's snapshot in the local Hugging Face cache (where loading it put it;
    nothing is downloaded).

    Raises:
        OSError, ValueError: no such folder, and not in the cache."""
    folder = Path(base)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(base), revision=revision, local_files_only=True))


def ship_histogram_of_weights(
    expert: str | os.PathLike,
    base: str | os.PathLike,
    weights: Mapping[str, torch.Tensor],
    *,
    score: str = SCORES[0],
    bias_correction: bool = True,
) -> Path:
    """:func:`save_ffg_histogram` for weights still in memory: the ones about to be saved to
    ``expert`` (``OTACallback`` calls it at the end of training, when the moments are in
    ``<expert>/ota/`` and the weights not yet saved: the Trainer fires no callback after its final
    save). It counts what a merge would count from the saved files: the base's floating tensors
    that the moments hold (read from ``base``, as stored), against ``weights[name]`` (the saved
    names; same dtypes as saved), with the moments as the merger reads them.

    Args:
        expert: the folder the moments were written to (and the weights will be).
        base: the base model's folder.
        weights: saved name -> tensor (any device; viewed, not copied, on the CPU).

    Raises:
        FormatError: the base or the moments are not valid. ValueError: a tensor the moments
            hold is missing from ``weights`` or the base, or their sizes differ."""
    from ..backends.torch import count_saliencies, moment_view, saliency_score
    from ..io.checkpoint import ModelFolder
    from ..io.folders import open_model, open_moments_file
    from ..io.layout import FLOAT_DTYPES, MOMENTS_FILE, matrix_view
    from ..moments.format import MomentsReader

    label = str(expert)
    base_layout = open_model(base, str(base))
    info = base_layout.tensors
    layout = open_moments_file(Path(expert) / MOMENTS_DIR / MOMENTS_FILE, label)
    held = [n for n in layout.stored if n not in weights]
    if held:
        raise WeightsHeldElsewhere(f"{label}: the moments' {held[0]!r} is not among the weights in memory", held[0])
    names = histogram_domain([n for n in base_layout.names if info[n].dtype in FLOAT_DTYPES], layout.stored, score)
    for n in names:
        if n not in weights or weights[n].numel() != math.prod(info[n].shape):
            have = "missing" if n not in weights else f"{weights[n].numel()} entries"
            raise ValueError(f"{label}: weight {n!r} is {have}; the base's has {math.prod(info[n].shape)}")

    with MomentsReader(layout, bias_correction=bias_correction, model=label) as moments:
        base_folder = ModelFolder(base_layout)

        def tensors():
            for n in names:
                shape = matrix_view(info[n].shape)
                w = weights[n].detach().to("cpu").reshape(shape).contiguous()
                sc = saliency_score(moment_view(moments, n, shape), score)
                yield base_folder.view(n).reshape(shape), [w], [sc]

        try:
            (hist,) = count_saliencies(tensors(), 1)
        finally:
            base_folder.close()
    total = sum(math.prod(info[n].shape) for n in names)
    describes = describe(score, None if score == "magnitude" else layout.scale(bias_correction), names, total)
    return _ship(Path(expert), hist, describes, layout.metadata, base)
