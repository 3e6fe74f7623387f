"""PEFT LoRA adapters as merge experts.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT's
``save_pretrained`` writes it, locally or from a Hub repo) is merged as the full expert it
stands for: ``W = W0 + scale * B A`` for every adapted weight (``scale = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA; per-module ``rank_pattern`` / ``alpha_pattern``
honoured), ``W0`` everywhere else. :func:`materialize` writes that expert's adapted weights (one
weight in memory at a time) into a working folder beside the output, the rest read in place from
the base's files, with its moments: the
adapter's own ``ota/moments.safetensors`` (curvature of the adapted weights, keyed by the base
weight names, as :class:`~ota_trainer.capture.OTACallback` captures it during LoRA training),
and zero curvature for every weight the adapter leaves alone, so FFG and OTA give it no say
there. Then every method, backend and check runs on it unchanged.

:func:`export_adapter` goes the other way for the output (``out_adapter_rank``): the merged
edit ``W - W0`` of each weight the LoRA experts update, as a rank-``r`` LoRA adapter (truncated
SVD, the best rank-``r`` approximation in the Frobenius norm), with each module's relative
reconstruction error.

Refused by name, with why: DoRA (``use_dora``), ``modules_to_save``, trained biases, and any
adapter type but LoRA.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FormatError, IncompatibleModelsError, brief
from ..io.layout import (
    MANAGED_KEYS,
    MOMENTS_DIR,
    MOMENTS_FILE,
    confined_file,
    read_json_file,
    read_safetensors_layout,
    real_folder,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraAdapter",
    "is_adapter_folder",
    "open_adapter",
    "materialize",
    "export_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_[AB])$"
)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A PEFT adapter folder: ``adapter_config.json`` and no full model weights."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (
        (p / "model.safetensors").exists() or (p / "model.safetensors.index.json").exists()
    )


@dataclass
class LoraModule:
    """One adapted weight: ``W0 + scale * B A`` (``transpose``: ``(B A)^T``, for embeddings and
    ``fan_in_fan_out`` layers)."""

    weight: str  # the base weight's name
    a: str  # the adapter tensors' names
    b: str
    scale: float
    transpose: bool = False
    shape: tuple[int, ...] = ()  # of the update (the base weight's shape)


@dataclass
class LoraAdapter:
    """A validated LoRA adapter folder (:func:`open_adapter`)."""

    path: Path
    label: str
    config: dict[str, Any]
    weights: Path
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base weight name -> module

    @property
    def base_model(self) -> str | None:
        b = self.config.get("base_model_name_or_path")
        return b if isinstance(b, str) and b else None


def _pattern_value(patterns: Any, module: str, default: float, what: str, label: str) -> float:
    """PEFT's per-module ``rank_pattern`` / ``alpha_pattern``: the value of the first pattern the
    module name ends with (as a regex), else ``default``."""
    if not patterns:
        return default
    if not isinstance(patterns, dict):
        raise FormatError(f"{label}: {ADAPTER_CONFIG}: {what} must be a mapping, got {brief(patterns)}")
    for pattern, value in patterns.items():
        if not isinstance(pattern, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FormatError(f"{label}: {ADAPTER_CONFIG}: {what} entry {brief(pattern)}: {brief(value)}")
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(value)
        except re.error as e:
            raise FormatError(f"{label}: {ADAPTER_CONFIG}: {what} pattern {brief(pattern)}: {e}") from None
    return default


def open_adapter(path: str | os.PathLike, label: str | None = None) -> LoraAdapter:
    """Open and check a LoRA adapter folder: its config (type, rank, alpha, options) and its
    weights' header (every tensor a pair of LoRA factors of consistent rank).

    Raises:
        FormatError: a missing or malformed file, naming it.
        ConfigError: an adapter kind we do not merge (DoRA, ``modules_to_save``, biases, not LoRA).
    """
    label = label or str(path)
    root = real_folder(path, label)
    cfg_path = confined_file(root, ADAPTER_CONFIG, label)
    if cfg_path is None:
        raise FormatError(f"{label}: no {ADAPTER_CONFIG}", path=str(root))
    config = read_json_file(cfg_path, f"{label}: {ADAPTER_CONFIG}")
    if not isinstance(config, dict):
        raise FormatError(f"{label}: {ADAPTER_CONFIG} is not a JSON object", path=str(cfg_path))
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"{label}: a {brief(kind)} adapter; only LoRA adapters (peft_type LORA) are merged")
    if config.get("use_dora"):
        raise ConfigError(
            f"{label}: a DoRA adapter (use_dora: true): its magnitude vector rescales every column of W0 + BA, "
            "which a merge of edits does not represent; merge it into its base first (merge_and_unload) and give "
            "the resulting folder"
        )
    if config.get("modules_to_save"):
        raise ConfigError(
            f"{label}: modules_to_save {brief(config['modules_to_save'])}: full copies of modules inside an adapter "
            "are not merged; merge it into its base first (merge_and_unload) and give the resulting folder"
        )
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{label}: bias={brief(config.get('bias'))}: adapters with trained biases are not merged")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise FormatError(f"{label}: {ADAPTER_CONFIG}: r={brief(r)} is not a positive integer", path=str(cfg_path))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise FormatError(f"{label}: {ADAPTER_CONFIG}: lora_alpha={brief(alpha)} is not a number", path=str(cfg_path))
    weights = confined_file(root, ADAPTER_WEIGHTS, label)
    if weights is None:
        raise FormatError(f"{label}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)", path=str(root))
    header, _ = read_safetensors_layout(weights)
    parts: dict[str, dict[str, str]] = {}
    for key in header:
        if key == "__metadata__":
            continue
        m = _KEY.match(key)
        if m is None:
            raise FormatError(
                f"{weights}: tensor {brief(key)} is not a LoRA factor (lora_A / lora_B)", path=str(weights)
            )
        module = m.group("module") or m.group("emodule")
        part = (m.group("part") or m.group("epart")).replace("lora_embedding_", "lora_")
        module = module[len(_PREFIX) :] if module.startswith(_PREFIX) else module
        parts.setdefault(module, {})[part] = key
    adapter = LoraAdapter(root, label, config, weights)
    for module, pair in sorted(parts.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise FormatError(
                f"{weights}: {module} has {sorted(pair)} but not both lora_A and lora_B", path=str(weights)
            )
        a, b = header[pair["lora_A"]], header[pair["lora_B"]]
        embedding = "lora_embedding_A" in pair["lora_A"]
        rank = a["shape"][0] if not embedding else a["shape"][0]
        if len(a["shape"]) != 2 or len(b["shape"]) != 2 or b["shape"][1] != rank:
            raise FormatError(
                f"{weights}: {module}: lora_A {a['shape']} and lora_B {b['shape']} are not factors of one rank",
                path=str(weights),
            )
        want_r = _pattern_value(config.get("rank_pattern"), module, r, "rank_pattern", label)
        if rank != int(want_r):
            raise FormatError(
                f"{weights}: {module}: rank {rank}, but {ADAPTER_CONFIG} says {int(want_r)}", path=str(weights)
            )
        a_alpha = _pattern_value(config.get("alpha_pattern"), module, float(alpha), "alpha_pattern", label)
        scale = a_alpha / math.sqrt(rank) if config.get("use_rslora") else a_alpha / rank
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        shape = (b["shape"][0], a["shape"][1])
        adapter.modules[module + ".weight"] = LoraModule(
            module + ".weight", pair["lora_A"], pair["lora_B"], scale, transpose, shape[::-1] if transpose else shape
        )
    if not adapter.modules:
        raise FormatError(f"{weights}: no LoRA factors", path=str(weights))
    return adapter


def check_adapter(adapter: LoraAdapter, base) -> None:
    """Every weight the adapter updates is in the base (a :class:`~ota_trainer.io.folders.ModelLayout`),
    floating, with the update's shape (headers only).

    Raises:
        IncompatibleModelsError: naming the adapter and the weight.
    """
    from ..io.layout import DTYPES

    for name, mod in adapter.modules.items():
        t = base.tensors.get(name)
        if t is None or tuple(t.shape) != tuple(mod.shape) or not DTYPES[t.dtype].floating:
            have = "does not have" if t is None else f"has as {tuple(t.shape)} {t.dtype}"
            raise IncompatibleModelsError(
                f"{adapter.label}: updates {name!r} as {tuple(mod.shape)}, which the base {base.label} {have}: "
                "an adapter of another model",
                model=adapter.label,
            )


def materialize(adapter: LoraAdapter, base, dest: Path):
    """The full expert ``adapter`` stands for, as the merge reads it: ``W0 + scale * B A``
    (float32 arithmetic, the base's dtype) for each adapted weight, written into ``dest`` (a new
    folder), one weight in memory at a time; every other tensor read in place from the base's
    files (the expert's layout names both, so nothing the adapter leaves alone is copied); and
    moments for every floating weight in ``dest/ota/`` (the adapter's where it has them, zero
    curvature where it leaves the weight alone).

    Args:
        base: the base's :class:`~ota_trainer.io.folders.ModelLayout`.

    Returns:
        The expert's :class:`~ota_trainer.io.folders.ModelLayout` (its folder: ``dest``).

    Raises:
        IncompatibleModelsError: an adapted weight the base lacks, or of another shape.
        FormatError: the adapter's moments name weights it does not adapt.
    """
    import torch
    from safetensors import safe_open

    from ..io.checkpoint import ModelFolder
    from ..io.folders import ModelLayout
    from ..io.layout import DTYPES, folder_tensors, matrix_shape
    from ..io.write import StreamingSafetensorsWriter
    from ..moments.format import Rank1Factors, load_moments, save_moments

    check_adapter(adapter, base)
    dest.mkdir(parents=True)
    names = base.names
    adapted = [n for n in names if n in adapter.modules]
    # the base's files under keys of their own ("base/<file>"): the expert's file names stay apart
    tensors = {n: replace(t, file=f"base/{t.file}") for n, t in base.tensors.items()}
    files = {f"base/{f}": real for f, real in base.files.items()}
    if adapted:
        folder = ModelFolder(base)
        # through the page cache: the merge reads these files back at once (with direct I/O they went to
        # the disk and came back from it). Two r=16 adapters of a 0.5B base (bench_merge.py --lora 16,
        # cold cache, best of 3; 2026-12-06, Intel Xeon, Sapphire Rapids class, AVX-512, 2 cores, a VM):
        # after 10 s idle 4.0 s (4.3 CPU-s) instead of 4.7 s (5.2); at once 3.7 s (3.2) instead of 3.8 (3.5)
        writer = StreamingSafetensorsWriter(
            dest,
            [(n, base.tensors[n].shape, base.tensors[n].dtype) for n in adapted],
            max_shard_bytes=1 << 50,
            direct=False,
        )
        try:
            with safe_open(str(adapter.weights), "pt") as f:
                for n in adapted:
                    w0, mod = folder.get(n), adapter.modules[n]
                    a, b = f.get_tensor(mod.a).float(), f.get_tensor(mod.b).float()
                    delta = (b @ a) * mod.scale  # its shape checked against the base's by check_adapter
                    w0 = (w0.float() + (delta.T if mod.transpose else delta)).to(w0.dtype)
                    writer.write_bytes(
                        n, tuple(w0.shape), base.tensors[n].dtype, memoryview(w0.reshape(-1).view(torch.uint8).numpy())
                    )
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            folder.close()
        edits, edit_files = folder_tensors(real_folder(dest, adapter.label), adapter.label)
        tensors.update(edits)
        files.update(edit_files)
    layout = ModelLayout(
        real_folder(dest, adapter.label), adapter.label, tensors, list(names), files, base.config, base.has_config
    )
    own = confined_file(adapter.path, f"{MOMENTS_DIR}/{MOMENTS_FILE}", adapter.label)
    if own is None:
        return layout  # no moments: the merge says what to do (as for any expert without them)
    with load_moments(own) as moments:
        extra = [n for n in moments.shapes if n not in adapter.modules and n not in base.tensors]
        if extra:
            raise FormatError(
                f"{own}: moments for {brief(extra[:3])}, which neither the adapter nor its base has", path=str(own)
            )
        # an edited weight without moments is left without them (the merge then says so, or takes uniform
        # curvature with allow_missing_moments): zero curvature would have FFG revert every edit there
        floats = [
            n
            for n in names
            if DTYPES[base.tensors[n].dtype].floating and (n in moments.shapes or n not in adapter.modules)
        ]

        class _All:
            def items(self):
                for n in floats:
                    shape = tuple(base.tensors[n].shape)
                    if n in moments.shapes:
                        yield n, moments.raw(n)  # as stored: rank-one sums stay exact
                    elif len(shape) >= 2:
                        m, k = matrix_shape(shape)
                        yield n, Rank1Factors(torch.zeros(m), torch.zeros(k), shape)
                    else:
                        yield n, torch.zeros(shape)

            def __iter__(self):
                return iter(floats)

            def __len__(self):
                return len(floats)

        meta = {k: v for k, v in moments.metadata.items() if k not in MANAGED_KEYS}
        meta["written_before_weights"] = False  # these weights are written now, from the adapter
        meta["adapter"] = {"path": str(adapter.path), "r": adapter.config.get("r"), "modules": len(adapter.modules)}
        save_moments(dest, _All(), compression="rank1", metadata=meta)
    return layout


ADAPTER_DIR = "adapter"  # the merged edit as a LoRA adapter, inside the output (out_adapter_rank)


def export_adapter(
    out: Path, base, modules: dict[str, LoraModule], rank: int, base_model: str | None
) -> tuple[list[str], dict[str, Any]]:
    """Write ``out/adapter/``: a PEFT LoRA adapter of rank ``rank`` whose ``B A`` is the best
    rank-``rank`` approximation (truncated SVD) of each module's merged edit ``W - W0`` (``W``
    read from the merged weights in ``out``, ``W0`` from ``base``, float32 arithmetic). Factors
    are balanced (``B = U sqrt(S)``, ``A = sqrt(S) V^T``), ``lora_alpha = r`` (scale 1), float32;
    an edit of lower rank is padded with zero factors.

    Args:
        out: the merged model folder (in its staging place).
        base: the base's :class:`~ota_trainer.io.folders.ModelLayout`.
        modules: the weights to export (base weight name -> the LoRA experts' module).

    Returns:
        The files written (relative to ``out``) and the report: rank, and per module the edit's
        rank kept and ``rel_error = ||dW - B A||_F / ||dW||_F`` (0 for an edit that is all zero).

    Raises:
        ConfigError: fan-in-fan-out and ordinary linear layers mixed (one adapter cannot hold both).
    """
    import json

    import torch
    from safetensors.torch import save_file

    from ..io.checkpoint import ModelFolder

    linear = {n: m for n, m in modules.items() if ".lora_embedding_" not in m.a}
    flipped = {m.transpose for m in linear.values()}
    if len(flipped) > 1:
        raise ConfigError(
            "out_adapter_rank: the LoRA experts update both fan-in-fan-out (Conv1D) and ordinary linear layers; "
            "one adapter cannot hold both"
        )
    merged, original = ModelFolder(out), ModelFolder(base)
    tensors: dict[str, torch.Tensor] = {}
    per_module: dict[str, dict[str, Any]] = {}
    targets: list[str] = []
    total_err = total_norm = 0.0
    try:
        for name in sorted(modules):
            mod = modules[name]
            edit = merged.get(name).float() - original.get(name).float()
            if mod.transpose:  # (B A)^T is stored: embeddings, fan-in-fan-out layers
                edit = edit.T
            u, sv, vh = torch.linalg.svd(edit, full_matrices=False)
            # the edit's numerical rank (numpy's matrix_rank tolerance): directions below it are rounding
            tol = float(sv[0]) * max(edit.shape) * torch.finfo(torch.float32).eps if len(sv) else 0.0
            k = min(rank, int((sv > tol).sum()))
            root = sv[:k].sqrt()
            b = torch.zeros(edit.shape[0], rank)
            a = torch.zeros(rank, edit.shape[1])
            b[:, :k], a[:k] = u[:, :k] * root, root[:, None] * vh[:k]
            s2 = sv.double().square()
            norm, err = float(s2.sum()), float(s2[k:].sum())
            total_norm, total_err = total_norm + norm, total_err + err
            per_module[name] = {"rank": k, "rel_error": math.sqrt(err / norm) if norm > 0 else 0.0}
            module = name[: -len(".weight")] if name.endswith(".weight") else name
            targets.append(module)
            if ".lora_embedding_" in mod.a:
                tensors[f"{_PREFIX}{module}.lora_embedding_A"], tensors[f"{_PREFIX}{module}.lora_embedding_B"] = a, b
            else:
                tensors[f"{_PREFIX}{module}.lora_A.weight"], tensors[f"{_PREFIX}{module}.lora_B.weight"] = a, b
    finally:
        merged.close()
        original.close()
    dest = out / ADAPTER_DIR
    dest.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,  # scale 1: B A is the edit
        "lora_dropout": 0.0,
        "target_modules": targets,  # (in name order)
        "fan_in_fan_out": bool(flipped and flipped.pop()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    report = {
        "path": ADAPTER_DIR,
        "rank": rank,
        "rel_error": math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0,
        "modules": per_module,
    }
    return [f"{ADAPTER_DIR}/{ADAPTER_CONFIG}", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"], report


class AdapterExperts:
    """A resolver (``reference -> folder``) that gives the full expert an adapter stands for:
    adapter folders are materialized (:func:`materialize`: its edited weights into ``workdir``,
    the rest read from the base) on first use, and given as that expert's validated
    :class:`~ota_trainer.io.folders.ModelLayout`; other references pass through as folders.
    Every other attribute (``sha``, ``config``, ...) is ``resolver``'s.
    Remove ``workdir`` with :meth:`cleanup` (the merge does, whatever happens)."""

    def __init__(self, resolver, base_ref: str | None, workdir: Path):
        self._resolver, self._base_ref, self.workdir = resolver, base_ref, workdir
        self._done: dict[str, Any] = {}  # reference -> the expert's ModelLayout
        self.modules: dict[str, LoraModule] = {}  # every adapted weight of the adapters materialized
        self.edited: dict[str, frozenset[str]] = {}  # reference -> the weights its adapter edits

    def __getattr__(self, name: str):
        return getattr(self._resolver, name)

    def __call__(self, ref: str) -> Any:
        folder = Path(self._resolver(ref))
        if not is_adapter_folder(folder):
            return folder
        if ref not in self._done:
            from ..io.folders import open_model

            if self._base_ref is None:
                raise ConfigError(f"{ref}: a LoRA adapter needs its base model (base_model)")
            adapter = open_adapter(folder, ref)
            base = open_model(self._resolver(self._base_ref), self._base_ref)
            logger.info("%s: a LoRA adapter of %d weights: merged as W0 + scale * B A", ref, len(adapter.modules))
            self._done[ref] = materialize(adapter, base, self.workdir / f"expert-{len(self._done)}")
            for name, mod in adapter.modules.items():
                self.modules.setdefault(name, mod)
            self.edited[ref] = frozenset(adapter.modules)
        return self._done[ref]

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def fill_base_model(data: dict[str, Any], adapter_config) -> dict[str, Any]:
    """A recipe mapping whose ``base_model`` is the one its adapter experts name
    (``base_model_name_or_path``) when it gives none; when it gives one and an adapter names
    another Hub repo, that is an error. ``adapter_config(ref)``: an expert's adapter config, or
    None when it is not an adapter (reads only that file). Other recipes are returned as they are.

    Raises:
        ConfigError: adapters naming different bases, or one the recipe contradicts.
    """
    models = data.get("models")
    if not isinstance(models, list):
        return data
    named = {}
    for m in models:
        ref = m.get("model") if isinstance(m, dict) else m
        if not isinstance(ref, str):
            continue
        try:
            cfg = adapter_config(ref)
        except (FormatError, ConfigError):
            raise
        except Exception:  # noqa: BLE001 - an unresolvable reference is reported where the merge resolves it
            continue
        if isinstance(cfg, dict):
            b = cfg.get("base_model_name_or_path")
            named[ref] = b if isinstance(b, str) and b else None
    bases = {b for b in named.values() if b}
    given = data.get("base_model")
    if not given:
        if len(bases) > 1:
            raise ConfigError(f"the adapters name different bases ({sorted(bases)}); give base_model (--base)")
        return {**data, "base_model": bases.pop()} if bases else data
    repo_like = re.compile(r"^[\w.-]+/[\w.-]+$")
    for ref, b in named.items():
        if b and isinstance(given, str) and repo_like.match(b) and repo_like.match(given.split("@")[0]):
            if b != given.split("@")[0]:
                raise ConfigError(f"{ref}: an adapter of {b}, but base_model is {given}")
    return data
