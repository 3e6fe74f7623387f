"""Backends that compute a merge: native kernels on raw addresses (:mod:`.native`) and PyTorch
(:mod:`.torch`); FFG's bins and thresholds they share with the runner (:mod:`.thresholds`).

The runner (:mod:`ota_trainer.merger.runner`) picks a backend by what it covers and drives it
through the small interface :class:`Backend` describes; neither the runner nor a backend knows a
method by its name: a backend runs the method's own implementation (``MergeMethod.native`` or
``MergeMethod.torch``) tensor by tensor.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Backend"]


class Backend(Protocol):
    """What the runner asks of a backend (one instance per merge)."""

    name: str

    @staticmethod
    def covers(recipe, inputs) -> str | None:
        """Why this backend cannot do the merge, or None when it can (checked before it is built)."""

    def start_reads(self) -> None:
        """Start reading the inputs into the page cache, in the order the passes read them."""

    def histograms(self, experts: list[int], names: list[str]) -> list:
        """FFG's first pass: each listed expert's saliencies over ``names`` counted into a
        :class:`~ota_trainer.backends.thresholds.Histogram`."""

    def set_thresholds(self, thresholds: list) -> None:
        """Each expert's FFG :class:`~ota_trainer.backends.thresholds.Threshold` (None: per tensor, or none)."""

    def merge_tensor(
        self, name: str, nxt: list[str], out: memoryview | None = None
    ) -> tuple[memoryview, list[int] | None]:
        """Tensor ``name`` merged: its bytes in the output dtype (valid until the next call) and,
        for a grafting method, the entries each expert's mask kept. ``nxt``: the tensors merged next.
        ``out``: writable memory for the bytes (the writer's), which the backend may fill and return
        instead of its own buffer (saving a copy)."""

    def raw_bytes(self, name: str) -> memoryview:
        """A tensor copied from the base as stored (integer buffers)."""

    def release(self, name: str) -> None:
        """``name`` is written: its input pages may be dropped from memory."""

    def close(self) -> None:
        """Free maps, buffers and open files."""
