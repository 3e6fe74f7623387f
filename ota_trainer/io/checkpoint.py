"""Lazy, read-only access to a Hugging Face model folder's weights, one tensor at a time.

Only the safetensors headers are read up front (names, shapes, dtypes); each tensor is read
from disk when asked for. Both single-file (``model.safetensors``) and sharded
(``model.safetensors.index.json``) folders are supported.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from .folders import ModelLayout, open_model
from .layout import (  # noqa: F401 - CONFIG_NAME, SAFE_WEIGHTS_*, SIDE_FILES: part of this module's API
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SIDE_FILES,
    prefetch_range,
    torch_dtype,
)

__all__ = ["TensorInfo", "ModelFolder", "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME", "SIDE_FILES", "CONFIG_NAME"]


def read_tensor(fh, path: str | os.PathLike, start: int, end: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """Read one tensor's bytes ``[start, end)`` of an open file into a fresh tensor.

    Plain reads, not a memory map: the result is private (safe to edit in place) and the
    process's resident memory holds only the tensors alive, not every page it has touched.

    Raises:
        FormatError: the file ends early.
    """
    buf = torch.empty(end - start, dtype=torch.uint8)
    fh.seek(start)
    if end > start and fh.readinto(memoryview(buf.numpy())) != end - start:
        raise FormatError(f"{path}: truncated while reading a tensor; download or copy it again", path=str(path))
    return buf.view(dtype).reshape(tuple(shape))


def map_tensor(fh, path: str | os.PathLike, start: int, end: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """A READ-ONLY tensor over bytes ``[start, end)`` of an open file, memory-mapped: no copy, the
    page cache's pages are the tensor. The mapping covers just this tensor and is released with
    it, so resident memory holds only the tensors alive. Never write into the result.

    Raises:
        FormatError: the file ends early (a mapping past the end would fault when read).
    """
    if end > os.fstat(fh.fileno()).st_size:
        raise FormatError(f"{path}: truncated while reading a tensor; download or copy it again", path=str(path))
    if end == start:
        return torch.empty(tuple(shape), dtype=dtype)
    lo = start - start % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fh.fileno(), end - lo, access=mmap.ACCESS_READ, offset=lo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": callers only read it
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=end - start, offset=start - lo)
    return flat.view(dtype).reshape(tuple(shape))  # the tensor keeps the mapping alive


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it looks like, read from a safetensors header."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # file name inside the folder
    offset: int  # byte offset of the data inside the file (for read ordering)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class ModelFolder:
    """A model checkpoint folder opened lazily, through its validated :class:`~ota_trainer.merger.inputs.ModelLayout`.

    Attributes:
        path: the folder (symlinks resolved).
        label: how errors name this model (a repo id or the folder path).
        layout: the validated layout (tensor spans, files, config, side files).
        tensors: name -> :class:`TensorInfo`, in file order.
        config: the parsed ``config.json`` (empty dict when absent).

    Raises:
        FormatError: no safetensors weights, a corrupt/truncated file, a file outside the
            folder (names the file).
    """

    def __init__(self, path: str | os.PathLike | ModelLayout, *, label: str | None = None):
        self.layout = path if isinstance(path, ModelLayout) else open_model(path, label)
        self.path = self.layout.path
        self.label = self.layout.label
        self.config: dict[str, Any] = self.layout.config
        self._spans = self.layout.tensors
        self.tensors: dict[str, TensorInfo] = {
            name: TensorInfo(name, t.shape, torch_dtype(t.dtype), t.file, t.offset) for name, t in self._spans.items()
        }
        self._open: dict[str, Any] = {}

    @property
    def files(self) -> list[Path]:
        """The weight files (real paths), in tensor order."""
        return self.layout.weight_paths

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    def names(self) -> list[str]:
        """Tensor names in on-disk order (file, then offset): reading in this order is sequential."""
        return list(self.layout.names)

    def _handle(self, file: str):
        fh = self._open.get(file)
        if fh is None:
            path = self.layout.files[file]
            try:
                fh = self._open[file] = open(path, "rb")
            except OSError as e:
                raise FormatError(f"{path}: cannot open ({e})", path=str(path)) from e
        return fh

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (its stored dtype) into fresh memory (safe to edit in place)."""
        info = self.tensors[name]
        fh = self._handle(info.file)
        start = self._spans[name].start
        return read_tensor(fh, self.layout.files[info.file], start, start + info.nbytes, info.dtype, info.shape)

    def view(self, name: str) -> torch.Tensor:
        """One tensor as a READ-ONLY memory map of its bytes (no copy; never write into it)."""
        info = self.tensors[name]
        fh = self._handle(info.file)
        start = self._spans[name].start
        return map_tensor(fh, self.layout.files[info.file], start, start + info.nbytes, info.dtype, info.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading ``name``'s bytes into the page cache (no memory of ours
        is used): the next tensor's disk reads then overlap the current tensor's compute."""
        info = self.tensors.get(name)
        if info is None:
            return
        try:
            fh = self._handle(info.file)
        except FormatError:
            return  # only a hint: get() reports the problem
        prefetch_range(fh, self._spans[name].start, info.nbytes)

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"ModelFolder({self.label!r}, {len(self.tensors)} tensors)"
