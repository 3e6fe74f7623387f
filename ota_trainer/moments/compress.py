"""Rank-one (AdaFactor-style) compression of Adam's second moments (method.md §2).

Pure tensor functions, no I/O. For a non-negative ``v`` of shape (m, n) we keep the row sums
``r = v.sum(1)`` and the column sums ``c = v.sum(0)`` and reconstruct
``v_hat = outer(r, c) / r.sum()``. Tensors with more than two dimensions are flattened to
``(shape[0], prod(shape[1:]))`` first; 1-D tensors are kept whole.
"""

from __future__ import annotations

import torch

from ..io.layout import matrix_shape  # noqa: F401 - part of this module's API

__all__ = ["matrix_shape", "is_factorable", "rank1_factors", "rank1_reconstruct"]


def is_factorable(shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether a tensor of ``shape`` is stored as rank-one factors (2 or more dims) or whole."""
    return len(shape) >= 2


@torch.no_grad()
def rank1_factors(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of ``v`` viewed as a matrix: ``r = v.sum(1)``, ``c = v.sum(0)``.

    Sums are accumulated in float32 (float64 when ``v`` is float64).

    Returns:
        ``(r, c)`` of shapes ``(m,)`` and ``(n,)`` where ``(m, n) = matrix_shape(v.shape)``.
    """
    m, n = matrix_shape(v.shape)
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    mat = v.reshape(m, n).to(acc)  # (m, n)
    return mat.sum(dim=1), mat.sum(dim=0)


@torch.no_grad()
def rank1_reconstruct(r: torch.Tensor, c: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """``v_hat = outer(r, c) / r.sum()`` reshaped to ``shape`` (float32).

    ``v_hat`` has the same row and column sums as the original ``v``, is non-negative when
    ``r`` and ``c`` are, and equals ``v`` exactly when ``v`` has rank one. When every row sum
    is zero (``v == 0``) the result is zero.
    """
    r = r.to(torch.float32)
    c = c.to(torch.float32)
    total = r.sum()
    if total <= 0:
        return torch.zeros(tuple(shape), dtype=torch.float32)
    # outer(r / total, c) keeps intermediate magnitudes close to v's own (no overflow of r*c).
    return torch.outer(r / total, c).reshape(tuple(shape))  # (m, n) -> shape
