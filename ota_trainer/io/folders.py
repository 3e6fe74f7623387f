"""A model folder and a moments file, opened and validated: every file confined to its folder
(:func:`~ota_trainer.io.layout.confined_file`), every safetensors header validated completely
(:func:`~ota_trainer.io.layout.read_safetensors_layout`), the moments metadata checked
(:func:`~ota_trainer.io.layout.parse_moments_metadata`). Every reader of the merge's inputs
(the backends, the diagnostics, ``push_expert``) reads through the :class:`ModelLayout` and
:class:`MomentsLayout` built here; the checks across models are the merger's
(:mod:`ota_trainer.merger.inputs`). Standard library only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError, brief
from .layout import (
    CONFIG_NAME,
    MOMENTS_DIR,
    MOMENTS_FILE,
    TensorSpan,
    check_moments_entries,
    confined_file,
    disk_order,
    folder_tensors,
    load_config,
    moments_scale,
    parse_moments_metadata,
    read_json_file,
    read_safetensors_layout,
    real_folder,
    side_files,
)

__all__ = ["ModelLayout", "MomentsLayout", "open_model", "open_moments", "open_moments_file", "TRAINER_STATE_NAME"]

TRAINER_STATE_NAME = "trainer_state.json"


@dataclass
class ModelLayout:
    """A model folder as validated: where each tensor's bytes are, and the files beside them.

    Attributes:
        path: the folder, symlinks resolved; every file below lies inside it (or is a blob of
            the Hugging Face cache it is a snapshot of).
        label: how messages name the model (repo id or the folder as given).
        tensors: name -> :class:`~ota_trainer.io.layout.TensorSpan` (validated offsets).
        names: tensor names in on-disk order.
        files: weight file name -> real path.
        config: ``config.json`` (empty when absent; ``has_config`` tells).
        side: side files (tokenizer, generation config, ...) -> real path.
        trainer_steps: ``(global_step, best_global_step)`` of ``trainer_state.json``, when the
            folder has one (the second None when it names no best checkpoint).
    """

    path: Path
    label: str
    tensors: dict[str, TensorSpan]
    names: list[str]
    files: dict[str, Path]
    config: dict[str, Any]
    has_config: bool
    side: dict[str, Path] = field(default_factory=dict)
    trainer_steps: tuple[int, int | None] | None = None

    def file(self, name: str) -> Path:
        """The real path of the weight file holding tensor ``name``."""
        return self.files[self.tensors[name].file]

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def weight_paths(self) -> list[Path]:
        return list(self.files.values())


def open_model(path: str | os.PathLike, label: str | None = None) -> ModelLayout:
    """Open a model folder: headers of every weight file, config, side files, trainer state.

    Raises:
        FormatError: naming the folder or file: no such folder, no weights, a corrupt header,
            a file outside the folder, an invalid config or index.
    """
    label = label or str(path)
    root = real_folder(path, label)
    tensors, files = folder_tensors(root, label)
    config_path = confined_file(root, CONFIG_NAME, label)
    config = load_config(config_path) if config_path is not None else {}
    return ModelLayout(
        root,
        label,
        tensors,
        disk_order(tensors),
        files,
        config,
        config_path is not None,
        side_files(root, label),
        _trainer_steps(root, label),
    )


def _trainer_steps(root: Path, label: str) -> tuple[int, int | None] | None:
    real = confined_file(root, TRAINER_STATE_NAME, label)
    if real is None:
        return None
    state = read_json_file(real, TRAINER_STATE_NAME)
    steps = [state.get(k) if isinstance(state, dict) else None for k in ("global_step", "best_global_step")]
    for key, step in zip(("global_step", "best_global_step"), steps):
        if (step is not None or key == "global_step") and not (
            isinstance(step, int) and not isinstance(step, bool) and step >= 0
        ):
            raise FormatError(f"{real}: {TRAINER_STATE_NAME} has no valid {key} ({brief(step)})", path=str(real))
    return steps[0], steps[1]


@dataclass
class MomentsLayout:
    """A moments file as validated (format v1, :mod:`ota_trainer.moments.format`).

    Attributes:
        path: the file (real path).
        label: the model it belongs to, as messages name it.
        header: the validated safetensors header (every listed tensor present, float32, of
            the shape the metadata gives; no other tensor).
        data_start: where the data section begins.
        metadata: the validated ``ota_moments`` metadata.
        shapes: parameter name -> shape. ``stored``: parameter name -> "rank1" | "full".
    """

    path: Path
    label: str
    header: dict[str, Any]
    data_start: int
    metadata: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    stored: dict[str, str]

    def span(self, key: str) -> tuple[int, int]:
        """Absolute byte range of the stored tensor ``key`` (``NAME``, ``NAME::row`` or ``NAME::col``)."""
        b, e = self.header[key]["data_offsets"]
        return self.data_start + b, self.data_start + e

    def scale(self, bias_correction: bool) -> float:
        """What the stored values are multiplied by when read (Adam's bias correction, or 1)."""
        return moments_scale(self.metadata, bias_correction)


def open_moments_file(path: str | os.PathLike, label: str | None = None) -> MomentsLayout:
    """Open and validate one moments file (header, metadata, listed tensors).

    Raises:
        FormatError: naming the file.
    """
    path = Path(path)
    header, start = read_safetensors_layout(path)
    meta = parse_moments_metadata(path, header)
    shapes = {n: tuple(p["shape"]) for n, p in meta["parameters"].items()}
    stored = {n: p["stored"] for n, p in meta["parameters"].items()}
    check_moments_entries(path, header, shapes, stored)
    return MomentsLayout(path, label or str(path), header, start, meta, shapes, stored)


def open_moments(model: ModelLayout) -> MomentsLayout | None:
    """The moments file of a model folder (confined to it), validated; None when it has none."""
    real = confined_file(model.path, f"{MOMENTS_DIR}/{MOMENTS_FILE}", model.label)
    return None if real is None else open_moments_file(real, model.label)
