"""Where things are in checkpoint folders and safetensors files: headers, weight files, the
moments file's names and constants. Standard library only (no PyTorch), so the merge CLI can
plan its reads and its first pass while PyTorch loads; :mod:`ota_trainer.format` and
:mod:`ota_trainer.checkpoint` build on it."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import FormatError

# bytes per element of each safetensors dtype code
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Files of a model folder besides the weights that a merged model inherits from its base.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

MOMENTS_DIR = "ota"
MERGE_READY_TAG = "ota-merge-ready"  # model-card tag of a checkpoint that carries moments
MOMENTS_FILE = "moments.safetensors"
METADATA_KEY = "ota_moments"
FORMAT_NAME = "ota-moments"
FORMAT_VERSION = 1
# Model-card tag naming the moments' format version. A tag (not only a card key) because
# Trainer.push_to_hub rebuilds README.md from the model's tags after every callback has run.
FORMAT_VERSION_TAG = f"{FORMAT_NAME}-v{FORMAT_VERSION}"
COMPRESSIONS = ("rank1", "full")
ROW_SUFFIX = "::row"
COL_SUFFIX = "::col"
# metadata keys save_moments writes itself (everything else passes through conversions)
MANAGED_KEYS = ("format", "format_version", "compression", "dtype", "parameters", "library_version")


def dtype_code(dtype) -> str:
    """The safetensors code ("BF16") of a code or a torch dtype."""
    if isinstance(dtype, str):
        return dtype
    from .format import DTYPE_CODES  # a torch dtype: PyTorch is loaded already

    return DTYPE_CODES[dtype]


def safetensors_header(entries: list[tuple[str, list[int], Any, int, int]], metadata: dict[str, str]) -> bytes:
    """The leading bytes of a safetensors file: 8-byte little-endian length + JSON header,
    padded so the data starts 8-byte aligned. ``entries`` are ``(name, shape, dtype, begin, end)``
    (dtype a code or a torch dtype) with offsets relative to the start of the data."""
    header: dict[str, Any] = {"__metadata__": metadata}
    for name, shape, dtype, begin, end in entries:
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def moments_path(folder: str | os.PathLike) -> Path:
    """Path of the moments file inside a checkpoint folder (``<folder>/ota/moments.safetensors``)."""
    return Path(folder) / MOMENTS_DIR / MOMENTS_FILE


def has_moments(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a moments file."""
    return moments_path(folder).is_file()


def bias_correction_factor(beta2: float, step: int) -> float:
    """Adam's bias correction of the second moment: ``v_hat = v / (1 - beta2**step)``; returns ``1 / (1 - beta2**step)``."""
    return 1.0 / (1.0 - float(beta2) ** int(step))


def row_total(values) -> float:
    """``sum(r)`` of rank-one row factors (float32 values), rounded to float32, computed exactly
    (``math.fsum``): the same number in every order, so every reader of the factors (the engine,
    the CLI's early first pass) derives bit-identical ``a = r / sum(r)``."""
    total = math.fsum(values)
    try:
        return struct.unpack("<f", struct.pack("<f", total))[0]
    except OverflowError:  # beyond float32's range, as a float32 sum would be
        return math.inf


def _fail(path: Path, what: str) -> FormatError:
    return FormatError(f"{path}: {what}", path=str(path))


def parse_moments_metadata(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The validated ``ota_moments`` JSON metadata of a moments file's header.

    Raises:
        FormatError: naming the file: missing or invalid metadata, another format or version.
    """
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise _fail(
            path,
            f"no '{METADATA_KEY}' metadata: not an ota_trainer moments file "
            "(write it with ota_trainer.save_moments or OTACallback)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _fail(path, f"moments metadata is not valid JSON ({e})") from e
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise _fail(path, f"moments metadata lacks {missing}")
    if meta["format"] != FORMAT_NAME:
        raise _fail(path, f"format is {meta['format']!r}, expected {FORMAT_NAME!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise _fail(
            path,
            f"moments format version {meta['format_version']} is not supported by this "
            f"ota_trainer ({__version__} reads version {FORMAT_VERSION}); upgrade ota_trainer"
        )
    if meta["compression"] not in COMPRESSIONS:
        raise _fail(path, f"unknown compression {meta['compression']!r}")
    params = meta["parameters"]
    if not isinstance(params, dict):
        raise _fail(path, "'parameters' must map names to {shape, stored}")
    for name, p in params.items():
        if not isinstance(p, dict) or p.get("stored") not in ("rank1", "full") or not isinstance(p.get("shape"), list):
            raise _fail(path, f"bad 'parameters' entry for {name!r}: {p!r}")
    return meta


def check_moments_entries(path: Path, header: dict[str, Any], shapes: dict[str, tuple[int, ...]], stored: dict[str, str]) -> None:
    """Every parameter the metadata lists has its tensors, of the shapes it says (FormatError otherwise)."""
    for name, shape in shapes.items():
        if stored[name] == "rank1":
            if len(shape) < 2:
                raise _fail(path, f"{name!r} is 1-D but stored rank1")
            m, n = matrix_shape(shape)
            want = {name + ROW_SUFFIX: [m], name + COL_SUFFIX: [n]}
        else:
            want = {name: list(shape)}
        for key, wshape in want.items():
            info = header.get(key)
            if info is None:
                raise _fail(path, f"tensor {key!r} listed in the metadata is missing")
            if list(info.get("shape", [])) != wshape:
                raise _fail(path, f"tensor {key!r} has shape {info.get('shape')}, metadata says {wshape}")


_REQUIRED_KEYS = ("format", "format_version", "compression", "step", "beta2", "parameters")


def matrix_shape(shape) -> tuple[int, int]:
    """(shape[0], prod(shape[1:])): the 2-D view a tensor is compressed as (rank-one factors
    index its rows and columns)."""
    n = 1
    for d in shape[1:]:
        n *= d
    return int(shape[0]), int(n)


def moments_scale(metadata: dict[str, Any], bias_correction: bool) -> float:
    """The factor a moments file's values are multiplied by when read: Adam's bias correction
    ``1 / (1 - beta2**step)`` if asked for and not already applied, else 1."""
    beta2, step = metadata.get("beta2"), metadata.get("step")
    if not bias_correction or metadata.get("bias_corrected") or beta2 is None or not step:
        return 1.0
    return bias_correction_factor(beta2, step)


def prefetch_range(fh, start: int, length: int) -> None:
    """Ask the kernel to start reading ``[start, start + length)`` of an open file into the page
    cache (``posix_fadvise(WILLNEED)``): a hint that uses no memory of ours; ignored where unsupported."""
    if length <= 0 or not hasattr(os, "posix_fadvise"):
        return
    try:
        os.posix_fadvise(fh.fileno(), start, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


def read_safetensors_layout(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file and the byte offset where its data starts."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: not a safetensors file (shorter than 8 bytes)", path=str(path))
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise FormatError(f"{path}: corrupt or truncated safetensors header", path=str(path))
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise FormatError(f"{path}: file not found", path=str(path)) from e
        raise FormatError(f"{path}: corrupt safetensors header ({e})", path=str(path)) from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header", path=str(path))
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise FormatError(f"{path}: corrupt entry {key!r} in safetensors header", path=str(path)) from e
    if 8 + n + end > size:
        raise FormatError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end}); "
            "download or copy it again",
            path=str(path),
        )
    return header, 8 + n


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor of a model folder lives: its weight file (name inside the folder),
    safetensors dtype code, shape, and byte range; ``offset`` is its start inside the file's
    data section (the on-disk order)."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def folder_tensors(path: Path, label: str) -> dict[str, TensorSpan]:
    """Every tensor of a model folder's weight files, file by file in header order.

    Raises:
        FormatError: naming the file: no weights, a corrupt header, a tensor in two files, or
            a dtype safetensors readers here do not know.
    """
    out: dict[str, TensorSpan] = {}
    for file in weight_files(path, label):
        header, start = read_safetensors_layout(path / file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in out:
                raise FormatError(f"{path / file}: tensor {name!r} appears in two weight files", path=str(path / file))
            if info.get("dtype") not in DTYPE_SIZES:
                raise FormatError(f"{path / file}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}", path=str(path / file))
            b, e = (int(x) for x in info["data_offsets"])
            out[name] = TensorSpan(file, info["dtype"], tuple(int(d) for d in info["shape"]), start + b, start + e, b)
    return out


def disk_order(tensors: dict[str, TensorSpan]) -> list[str]:
    """Tensor names in on-disk order (file, then offset): reading in this order is sequential."""
    files = {f: i for i, f in enumerate(dict.fromkeys(t.file for t in tensors.values()))}
    return sorted(tensors, key=lambda n: (files[tensors[n].file], tensors[n].offset))


def read_config(path: Path) -> dict[str, Any]:
    """A model folder's parsed config.json (empty when absent; FormatError when invalid)."""
    p = path / CONFIG_NAME
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: invalid config.json ({e})", path=str(p)) from e


def matrix_view(shape) -> tuple[int, int]:
    """The (m, n) view a tensor is merged as: :func:`matrix_shape` for >= 2 dimensions, a
    column of all its entries otherwise."""
    return matrix_shape(shape) if len(shape) >= 2 else (math.prod(shape), 1)


def weight_files(path: Path, label: str) -> list[str]:
    """The safetensors weight files of a model folder (names inside it), in index order.

    Raises:
        FormatError: a bad index, a listed file missing, or no safetensors weights at all.
    """
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: invalid safetensors index ({e})", path=str(index)) from e
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise FormatError(f"{index}: lists {f!r}, which is missing from {path}", path=str(path / f))
        return files
    if (path / SAFE_WEIGHTS_NAME).is_file():
        return [SAFE_WEIGHTS_NAME]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return others
    hint = " (found PyTorch .bin weights: convert them with save_pretrained(..., safe_serialization=True))" if any(
        path.glob("*.bin")
    ) else ""
    raise FormatError(f"{label}: no safetensors weights in {path}{hint}", path=str(path))
