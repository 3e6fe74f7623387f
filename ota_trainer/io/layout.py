"""Where things are in checkpoint folders and safetensors files: headers, weight files, the
moments file's names and constants. Standard library only (no PyTorch), so the merge CLI can
plan its reads and its first pass while PyTorch loads; :mod:`ota_trainer.moments.format` and
:mod:`ota_trainer.io.checkpoint` build on it."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, FormatError, brief

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DType:
    """One tensor dtype, as every part of the merger names it: the safetensors ``code``, bytes
    per element, the PyTorch and recipe ``name``, and the native kernels' code (``kernel``, None
    when they do not read it)."""

    code: str
    size: int
    name: str
    floating: bool
    kernel: int | None = None


# The one dtype table; everything else below is derived from it.
DTYPES: dict[str, DType] = {
    d.code: d
    for d in (
        DType("F64", 8, "float64", True),
        DType("F32", 4, "float32", True, kernel=0),
        DType("BF16", 2, "bfloat16", True, kernel=1),
        DType("F16", 2, "float16", True, kernel=2),
        DType("I64", 8, "int64", False),
        DType("I32", 4, "int32", False),
        DType("I16", 2, "int16", False),
        DType("I8", 1, "int8", False),
        DType("U8", 1, "uint8", False),
        DType("BOOL", 1, "bool", False),
    )
}
DTYPE_SIZES = {c: d.size for c, d in DTYPES.items()}  # bytes per element of each safetensors code
FLOAT_DTYPES = tuple(c for c, d in DTYPES.items() if d.floating)  # the tensors a merge merges
OUTPUT_DTYPES = ("F32", "F16", "BF16")  # what a recipe's ``dtype`` may ask for
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

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
MAX_JSON_BYTES = 16 * 2**20  # config.json, an index, trainer_state.json
MAX_DIMS = 64  # dimensions of a tensor shape; real ones have at most a handful

MOMENTS_DIR = "ota"
MERGE_READY_TAG = "ota-merge-ready"  # model-card tag of a checkpoint that carries moments
MOMENTS_FILE = "moments.safetensors"
FFG_HISTOGRAM_FILE = "ffg_histogram.safetensors"  # beside the moments (ota_trainer.merger.ffg_shipped)
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
    """The safetensors code ("BF16") of a code, a name ("bfloat16") or a torch dtype."""
    if isinstance(dtype, str):
        return dtype if dtype in DTYPES else _BY_NAME[dtype]
    return _BY_NAME[str(dtype).removeprefix("torch.")]  # a torch dtype


def torch_dtype(code: str):
    """The torch dtype of a safetensors code (imports PyTorch)."""
    import torch

    return getattr(torch, DTYPES[code].name)


_BY_NAME = {d.name: c for c, d in DTYPES.items()}


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
    """Adam's bias correction of the second moment, ``v_hat = v / (1 - beta2**step)``: returns
    ``1 / (1 - beta2**step)``."""
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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(x: Any) -> tuple[int, ...] | None:
    """``x`` as a tensor shape (a list of at most ``MAX_DIMS`` non-negative ints), else None."""
    if not isinstance(x, list) or len(x) > MAX_DIMS or not all(_is_int(d) and 0 <= d < 2**62 for d in x):
        return None
    return tuple(x)


def parse_moments_metadata(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The validated ``ota_moments`` JSON metadata of a moments file's header: every key the
    merger uses has the type and range it needs (a file written by another tool, or by a
    stranger, gets a FormatError naming the key, never a crash or a silently wrong scale).

    Raises:
        FormatError: naming the file: missing or invalid metadata, another format or version.
    """
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        raise _fail(
            path,
            f"no '{METADATA_KEY}' metadata: not an ota_trainer moments file "
            "(write it with ota_trainer.save_moments or OTACallback)",
        )
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"moments metadata is not valid JSON ({brief(str(e))})") from e
    if not isinstance(meta, dict):
        raise _fail(path, f"moments metadata must be a JSON object, got {brief(meta)}")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise _fail(path, f"moments metadata lacks {missing}")
    if meta["format"] != FORMAT_NAME:
        raise _fail(path, f"format is {brief(meta['format'])}, expected {FORMAT_NAME!r}")
    if meta["format_version"] != FORMAT_VERSION or not _is_int(meta["format_version"]):
        raise _fail(
            path,
            f"moments format version {brief(meta['format_version'])} is not supported by this "
            f"ota_trainer ({__version__} reads version {FORMAT_VERSION}); upgrade ota_trainer",
        )
    if meta["compression"] not in COMPRESSIONS:
        raise _fail(path, f"unknown compression {brief(meta['compression'])}")
    beta2, step = meta["beta2"], meta["step"]
    if beta2 is not None and not (
        isinstance(beta2, (int, float)) and not isinstance(beta2, bool) and 0.0 <= beta2 < 1.0
    ):
        raise _fail(path, f"beta2 is {brief(beta2)}: Adam's beta2 lies in [0, 1) (null when the optimizer has none)")
    if step is not None and not (_is_int(step) and 0 <= step < 2**53):
        raise _fail(path, f"step is {brief(step)}: the optimizer step count is an integer >= 0 (or null)")
    if meta.get("global_step") is not None and not (_is_int(meta["global_step"]) and meta["global_step"] >= 0):
        raise _fail(path, f"global_step is {brief(meta['global_step'])}: an integer >= 0 (or absent)")
    if not isinstance(meta.get("bias_corrected", False), bool):
        raise _fail(path, f"bias_corrected is {brief(meta['bias_corrected'])}: true or false")
    captured = meta.get("captured_at")
    if captured is not None and not (
        isinstance(captured, (int, float)) and not isinstance(captured, bool) and math.isfinite(captured)
    ):
        raise _fail(path, f"captured_at is {brief(captured)}: a Unix time (or absent)")
    for key in ("written_before_weights", "load_best_model_at_end"):
        if not isinstance(meta.get(key, False), bool):
            raise _fail(path, f"{key} is {brief(meta[key])}: true or false")
    params = meta["parameters"]
    if not isinstance(params, dict):
        raise _fail(path, "'parameters' must map names to {shape, stored}")
    for name, p in params.items():
        if not isinstance(p, dict) or p.get("stored") not in ("rank1", "full") or _shape(p.get("shape")) is None:
            raise _fail(path, f"bad 'parameters' entry for {brief(name)}: {brief(p)}")
    return meta


def check_moments_entries(
    path: Path, header: dict[str, Any], shapes: dict[str, tuple[int, ...]], stored: dict[str, str]
) -> None:
    """Every parameter the metadata lists has its tensors, float32 and of the shapes it says, and
    the file holds no other tensor (FormatError otherwise)."""
    expected: set[str] = set()
    for name, shape in shapes.items():
        if stored[name] == "rank1":
            if len(shape) < 2:
                raise _fail(path, f"{brief(name)} is 1-D but stored rank1")
            m, n = matrix_shape(shape)
            want = {name + ROW_SUFFIX: (m,), name + COL_SUFFIX: (n,)}
        else:
            want = {name: tuple(shape)}
        for key, wshape in want.items():
            expected.add(key)
            info = header.get(key)
            if info is None:
                raise _fail(path, f"tensor {brief(key)} listed in the metadata is missing")
            if tuple(info["shape"]) != wshape:
                raise _fail(path, f"tensor {brief(key)} has shape {brief(info['shape'])}, metadata says {list(wshape)}")
            if info["dtype"] != "F32":
                raise _fail(path, f"tensor {brief(key)} is stored as {info['dtype']}; moments are float32 (F32)")
    extra = [k for k in header if k != "__metadata__" and k not in expected]
    if extra:
        raise _fail(path, f"tensor {brief(extra[0])} is not listed in the moments metadata ({len(extra)} such)")


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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {brief(dup)} appears twice")
    return out


def _header_bytes(path: Path) -> tuple[bytes, int]:
    """The raw JSON header of a safetensors file and the file's size (FormatError when unreadable)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _fail(path, "not a regular file")
            raw = f.read(8)
            if len(raw) < 8:
                raise _fail(path, "not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(st.st_size - 8, MAX_HEADER_BYTES):
                if n <= MAX_HEADER_BYTES:
                    raise _fail(
                        path,
                        f"truncated safetensors file ({st.st_size} bytes, its header alone needs {8 + n}); "
                        "download or copy it again",
                    )
                raise _fail(path, f"corrupt safetensors header (declares {n} header bytes)")
            data = f.read(n)
    except FileNotFoundError as e:
        raise _fail(path, "file not found") from e
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from e
    if len(data) != n:
        raise _fail(path, "changed while being read")
    return data, st.st_size


def read_safetensors_layout(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file, validated completely, and the byte offset where its data starts.

    This is the one place where the layout of every input file (weights and moments, local or
    from the Hub) is checked, before any backend touches its bytes. As the safetensors format
    requires: the header is a UTF-8 JSON object without duplicate keys; ``__metadata__`` maps
    strings to strings; every tensor has a known ``dtype``, a ``shape`` of non-negative ints and
    ``data_offsets`` ``[begin, end]`` of integers with ``end - begin == numel * itemsize``; the
    tensors tile the data section exactly (sorted by offset: no gap, no overlap, the first at 0),
    and the file ends where the last tensor does. Every returned entry holds exactly
    ``{"dtype", "shape", "data_offsets"}`` of those types.

    Raises:
        FormatError: naming the file (and the tensor): what is wrong and, for a short file,
            that it should be downloaded again.
    """
    path = Path(path)
    raw, size = _header_bytes(path)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _fail(path, f"corrupt safetensors header ({brief(str(e))})") from e
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "corrupt safetensors header: __metadata__ must map strings to strings")
    data_start, data_len = 8 + len(raw), size - 8 - len(raw)
    entries: dict[str, Any] = {"__metadata__": meta}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"tensor {brief(key)}"
        if not isinstance(info, dict):
            raise _fail(path, f"{where}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), _shape(info.get("shape")), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _fail(path, f"{where} has unsupported dtype {brief(dtype)} (known: {sorted(DTYPE_SIZES)})")
        if shape is None:
            raise _fail(path, f"{where} has no valid shape ({brief(info.get('shape'))}: a list of non-negative ints)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _fail(path, f"{where} has invalid data_offsets {brief(offsets)} (two integers [begin, end])")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if begin < 0 or end < begin or end - begin != nbytes:
            raise _fail(
                path, f"{where}: data_offsets {brief(offsets)} do not hold its {dtype} {list(shape)} ({nbytes} bytes)"
            )
        entries[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        spans.append((begin, end, key))
    spans.sort()
    if spans and spans[-1][1] > data_len:
        last = max(spans, key=lambda x: x[1])
        if spans[-1][0] < data_len:  # the data ends inside the last tensor: a short download
            raise _fail(
                path,
                f"truncated safetensors file ({size} bytes, header promises {data_start + last[1]} for tensor "
                f"{brief(last[2])}); download or copy it again",
            )
        raise _fail(
            path,
            f"tensor {brief(last[2])}: data_offsets [{last[0]}, {last[1]}] lie past the end of the "
            f"data ({data_len} bytes)",
        )
    cursor, previous = 0, None
    for begin, end, key in spans:
        if begin != cursor:
            what = f"overlap tensor {brief(previous)}" if begin < cursor else "leave a gap before them"
            raise _fail(
                path,
                f"tensor {brief(key)}: data_offsets [{begin}, {end}] {what} (byte {cursor}); "
                "tensors must tile the data section",
            )
        cursor, previous = end, key
    if cursor < data_len:
        raise _fail(path, f"{data_len - cursor} bytes after the last tensor that no tensor covers")
    return entries, data_start


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


def folder_tensors(path: Path, label: str) -> tuple[dict[str, TensorSpan], dict[str, Path]]:
    """Every tensor of a model folder's weight files, file by file in header order, each file
    validated by :func:`read_safetensors_layout` and confined to the folder (:func:`confined_file`);
    and the weight files (name inside the folder -> real path).

    Raises:
        FormatError: naming the file: no weights, a corrupt header, a tensor in two files, an
            index that disagrees with the files' headers.
    """
    out: dict[str, TensorSpan] = {}
    files, weight_map = _weight_files(path, label)
    for file, real in files.items():
        header, start = read_safetensors_layout(real)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in out:
                raise _fail(path / file, f"tensor {brief(name)} appears in two weight files")
            if weight_map is not None and weight_map.get(name) != file:
                raise _fail(
                    path / SAFE_WEIGHTS_INDEX_NAME,
                    f"places tensor {brief(name)} in {brief(weight_map.get(name))}, but it is in {file}",
                )
            b, e = info["data_offsets"]
            out[name] = TensorSpan(file, info["dtype"], tuple(info["shape"]), start + b, start + e, b)
    if weight_map is not None and len(weight_map) != len(out):
        lost = next(n for n in weight_map if n not in out)
        raise _fail(path / SAFE_WEIGHTS_INDEX_NAME, f"lists tensor {brief(lost)}, which no weight file holds")
    return out, files


def disk_order(tensors: dict[str, TensorSpan]) -> list[str]:
    """Tensor names in on-disk order (file, then offset): reading in this order is sequential."""
    files = {f: i for i, f in enumerate(dict.fromkeys(t.file for t in tensors.values()))}
    return sorted(tensors, key=lambda n: (files[tensors[n].file], tensors[n].offset))


def matrix_view(shape) -> tuple[int, int]:
    """The (m, n) view a tensor is merged as: :func:`matrix_shape` for >= 2 dimensions, a
    column of all its entries otherwise."""
    return matrix_shape(shape) if len(shape) >= 2 else (math.prod(shape), 1)


# -- files of a model folder, confined to it --------------------------------------------------------
_BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_REPO_FOLDER = re.compile(r"(models|datasets|spaces)--.+")


def real_folder(path: str | os.PathLike, label: str) -> Path:
    """``path`` with every symlink resolved: the folder every file of the model must stay in.

    Raises:
        FormatError: no such folder.
    """
    real = Path(os.path.realpath(Path(path).expanduser()))
    if not real.is_dir():
        raise FormatError(f"{label}: model folder {path} does not exist", path=str(path))
    return real


def _hf_blob(root: Path, real: Path) -> bool:
    """Whether ``real`` is a blob of the Hugging Face cache repo whose snapshot folder is ``root``
    (the cache's own ``snapshots/<sha>/<file> -> ../../blobs/<hash>`` links): the only place
    outside its folder a model's file may live."""
    snapshots = root.parent
    repo = snapshots.parent
    return (
        snapshots.name == "snapshots"
        and _REPO_FOLDER.fullmatch(repo.name) is not None
        and real.parent == repo / "blobs"
        and _BLOB_NAME.fullmatch(real.name) is not None
        and os.path.realpath(repo / "blobs") == str(repo / "blobs")
    )


def confined_file(root: Path, rel: str, label: str) -> Path | None:
    """The real path of the regular file ``rel`` of the model folder ``root`` (a
    :func:`real_folder`), or None when the folder has no such entry.

    ``rel`` must be a plain relative path (no ``..``, not absolute), and what it resolves to,
    symlinks followed, must lie inside ``root`` or be a blob of the Hugging Face cache that
    ``root`` is a snapshot of. Special files (FIFOs, devices, folders) are refused: reading one
    could hang or never end.

    Raises:
        FormatError: naming the folder and the file: a path or link leading outside the folder,
            a dangling link, or not a regular file.
    """
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or rel.startswith("/") or "\\" in rel or "\0" in rel or any(x in ("", ".", "..") for x in parts):
        raise FormatError(f"{label}: file name {brief(rel)} is not a plain relative path inside {root}", path=str(root))
    p = root.joinpath(*parts)
    try:
        os.lstat(p)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FormatError(f"{label}: cannot read {p} ({e.strerror or e})", path=str(p)) from e
    real = Path(os.path.realpath(p))
    if not (real == root or root in real.parents) and not _hf_blob(root, real):
        raise FormatError(
            f"{label}: {rel} leads to {brief(str(real))}, outside the model folder {root}; every file of a model "
            "folder must lie inside it",
            path=str(p),
        )
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise FormatError(f"{label}: {rel} is a dangling link or unreadable ({e.strerror or e})", path=str(p)) from e
    if not stat.S_ISREG(mode):
        raise FormatError(f"{label}: {rel} is not a regular file", path=str(p))
    return real


def read_json_file(path: Path, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A small JSON file (config, index, trainer state, ...), parsed; FormatError naming the file
    when it is too large, not UTF-8 or not JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise _fail(path, f"cannot read {what} ({e.strerror or e})") from e
    if len(data) > max_bytes:
        raise _fail(path, f"{what} is larger than {max_bytes // 2**20} MB")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"invalid {what} ({brief(str(e))})") from e


def read_config(path: Path, label: str | None = None) -> dict[str, Any]:
    """A model folder's parsed config.json (empty when absent; FormatError when invalid, not a
    JSON object, or outside the folder)."""
    real = confined_file(real_folder(path, label or str(path)), CONFIG_NAME, label or str(path))
    return {} if real is None else load_config(real)


def load_config(real: Path) -> dict[str, Any]:
    """A config.json file (confined already), parsed and checked: a JSON object whose
    ``architectures``, when present, is a list of names."""
    config = read_json_file(real, "config.json")
    if not isinstance(config, dict):
        raise _fail(real, f"config.json must hold a JSON object, got {type(config).__name__}")
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise _fail(real, f"'architectures' must be a list of names, got {brief(arch)}")
    return config


def side_files(root: Path, label: str) -> dict[str, Path]:
    """The base's files a merged model inherits (:data:`SIDE_FILES`) present in ``root``: name ->
    real path, each confined to the folder."""
    out = {}
    for name in SIDE_FILES:
        real = confined_file(root, name, label)
        if real is not None:
            out[name] = real
    return out


def _weight_files(path: Path, label: str) -> tuple[dict[str, Path], dict[str, str] | None]:
    """The safetensors weight files of a model folder: name inside it -> real path (index order),
    and the index's ``weight_map`` when there is an index."""
    root = real_folder(path, label)
    index = confined_file(root, SAFE_WEIGHTS_INDEX_NAME, label)
    if index is not None:
        data = read_json_file(index, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())
        ):
            raise _fail(
                path / SAFE_WEIGHTS_INDEX_NAME,
                "invalid safetensors index: 'weight_map' must map tensor names to weight file names",
            )
        files = {}
        for f in dict.fromkeys(weight_map.values()):
            real = confined_file(root, f, label)
            if real is None:
                raise _fail(path / SAFE_WEIGHTS_INDEX_NAME, f"lists {brief(f)}, which is missing from {path}")
            files[f] = real
        return files, weight_map
    names = (
        [SAFE_WEIGHTS_NAME]
        if confined_file(root, SAFE_WEIGHTS_NAME, label)
        else sorted(p.name for p in root.glob("*.safetensors"))
    )
    if names:
        return {f: confined_file(root, f, label) for f in names}, None
    hint = (
        " (found PyTorch .bin weights: convert them with save_pretrained(..., safe_serialization=True))"
        if any(root.glob("*.bin"))
        else ""
    )
    raise FormatError(f"{label}: no safetensors weights in {path}{hint}", path=str(path))


def weight_files(path: Path, label: str) -> dict[str, Path]:
    """The safetensors weight files of a model folder (name inside it -> real path), in index
    order, each confined to the folder (:func:`confined_file`).

    Raises:
        FormatError: a bad index, a listed file missing or outside the folder, or no
            safetensors weights at all.
    """
    return _weight_files(path, label)[0]


# -- what killed writers leave ----------------------------------------------------------------------
def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` exists on this host (``os.kill(pid, 0)`` finds none). False for
    this process, for another user's process, and where that cannot be asked (not POSIX: there
    ``os.kill(pid, 0)`` would send CTRL_C_EVENT)."""
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # PermissionError: it exists
        return False
    return False


def remove_dead_leftovers(target: Path, kinds: tuple[str, ...] = ("tmp",)) -> None:
    """Delete ``<target>.<kind>-<PID>`` files beside ``target`` whose writer process is gone (what a
    killed atomic write of ``target`` leaves). Files of live processes and other names stay."""
    prefix = target.name + "."
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        kind, _, pid = name[len(prefix) :].partition("-")
        if not name.startswith(prefix) or kind not in kinds or not (pid.isascii() and pid.isdigit()):
            continue
        if process_gone(int(pid)):
            try:
                os.unlink(target.parent / name)
                logger.info("removed %s, left by a writer that died (pid %s)", target.parent / name, pid)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.debug("could not remove %s: %s", target.parent / name, e)


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; anything near this is not one


def read_yaml(path: Path) -> Any:
    """A recipe file parsed with ``yaml.safe_load``: a regular file (a FIFO must not hang us) of at
    most :data:`MAX_RECIPE_BYTES`, UTF-8.

    Raises:
        ConfigError: naming the file: unreadable, too large, not YAML.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"recipe {path} is not a regular file")
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}") from e
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {path} is larger than {MAX_RECIPE_BYTES // 2**20} MB: not a merge recipe")
    import yaml  # light, and a dependency

    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, or an int too long to read
        raise ConfigError(f"recipe {path} is not valid YAML: {brief(str(e), 300)}") from e


def ffg_histogram_path(folder: str | os.PathLike) -> Path:
    """Where an expert ships its FFG histogram: ``<folder>/ota/ffg_histogram.safetensors``."""
    return Path(folder) / MOMENTS_DIR / FFG_HISTOGRAM_FILE
