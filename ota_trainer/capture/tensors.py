"""Pure tensor functions of the capture stage: optimizer state in, second moment out.

No I/O, no Trainer, no process groups (the DTensor helpers run the collectives DTensor
itself issues). Each function states the formula it implements.
"""

from __future__ import annotations

import torch

from ..moments.compress import matrix_shape, rank1_factors

__all__ = [
    "adafactor_rank1_factors",
    "adafactor_second_moment",
    "bnb_blockwise_blocksize",
    "dequantize_bnb_state2",
    "dtensor_rank1_factors",
    "flat_fragment_rank1_partials",
    "to_cpu_float32",
]


@torch.no_grad()
def to_cpu_float32(v: torch.Tensor) -> torch.Tensor:
    """A detached float32 CPU copy of ``v`` (never a view of optimizer state)."""
    return v.detach().to(device="cpu", dtype=torch.float32, copy=True)


@torch.no_grad()
def adafactor_rank1_factors(
    row_mean: torch.Tensor, col_mean: torch.Tensor, shape: tuple[int, ...] | torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our rank-one sums ``(r, c)`` from Adafactor's factored second moment.

    Adafactor (transformers ``Adafactor``) keeps, for a tensor of shape ``(..., m, n)``, the
    MEANS ``R = mean_j v[..., :, j]`` (``exp_avg_sq_row``, shape ``(..., m)``) and
    ``C = mean_i v[..., i, :]`` (``exp_avg_sq_col``, shape ``(..., n)``). Its own estimate of
    the second moment is ``v_hat = outer(R, C) / mean(R)``.

    For a 2-D tensor the sums this package stores (method.md §2) are exact conversions:
    ``r = R * n`` and ``c = C * m``; then ``outer(r, c) / sum(r)`` equals Adafactor's
    ``v_hat``. For more dims the factorisation is over the last two axes, which differs from
    our ``(shape[0], prod(shape[1:]))`` view: Adafactor's ``v_hat`` is built (one tensor at
    a time) and its row and column sums are returned.

    Args:
        row_mean: ``exp_avg_sq_row``, shape ``shape[:-1]``.
        col_mean: ``exp_avg_sq_col``, shape ``shape[:-2] + shape[-1:]``.
        shape: the parameter's shape (2 or more dims).

    Returns:
        ``(r, c)``, float32, of shapes ``(m,)`` and ``(n,)`` with ``(m, n) = matrix_shape(shape)``.
    """
    shape = tuple(int(d) for d in shape)
    row = row_mean.detach().to("cpu", torch.float32)
    col = col_mean.detach().to("cpu", torch.float32)
    if len(shape) == 2:
        m, n = shape
        return row.reshape(m) * n, col.reshape(n) * m  # r = R * n, c = C * m
    return rank1_factors(adafactor_second_moment(row, col))


@torch.no_grad()
def adafactor_second_moment(row_mean: torch.Tensor, col_mean: torch.Tensor) -> torch.Tensor:
    """Adafactor's own dense estimate ``v_hat[..., i, j] = R[..., i] * C[..., j] / mean(R[..., :])``.

    This is ``Adafactor._approx_sq_grad`` squared back: the update divides the gradient by
    ``sqrt(v_hat)``. Float32, shape ``row_mean.shape + col_mean.shape[-1:]``.
    """
    row = row_mean.detach().to("cpu", torch.float32)
    col = col_mean.detach().to("cpu", torch.float32)
    mean = row.mean(dim=-1, keepdim=True)  # (..., 1)
    scale = torch.where(mean > 0, row / mean.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(row))
    return scale.unsqueeze(-1) * col.unsqueeze(-2)  # (..., m, 1) * (..., 1, n) -> (..., m, n)


def bnb_blockwise_blocksize(numel: int, n_blocks: int) -> int:
    """Block size of a bitsandbytes blockwise-quantized state: the smallest power of two ``b``
    with ``ceil(numel / b) == n_blocks`` (bitsandbytes uses 256 today, 2048 in old releases).

    Two powers of two give the same block count only when both give one block, and then
    they split the tensor the same way, so the answer is unambiguous.

    Raises:
        ValueError: no power of two fits (not a blockwise state).
    """
    b = 1
    while b <= max(1, numel):
        if -(-numel // b) == n_blocks:
            return b
        b *= 2
    if n_blocks == 1:
        return b
    raise ValueError(f"cannot infer the block size of {n_blocks} quantization blocks over {numel} elements")


@torch.no_grad()
def dequantize_bnb_state2(state: dict, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Second moment of a bitsandbytes 2-state optimizer (``Adam8bit``, ``AdamW8bit``, paged and
    32-bit variants), float32 on CPU, in the parameter's ``shape``.

    * 32-bit state (and tensors below ``min_8bit_size``): ``state2`` is already ``v``.
    * 8-bit blockwise: ``v[k] = qmap2[state2[k]] * absmax2[k // blocksize]``, computed with
      ``bitsandbytes.functional.dequantize_blockwise``.
    * 8-bit non-blockwise (old bitsandbytes): ``v[k] = qmap2[state2[k]] * max2``.

    Raises:
        KeyError: ``state`` has no ``state2`` (not a 2-state optimizer).
    """
    q = state["state2"]
    if q.dtype != torch.uint8:
        return to_cpu_float32(q).reshape(tuple(shape))
    code = state["qmap2"]
    if "absmax2" in state:
        absmax = state["absmax2"]
        blocksize = bnb_blockwise_blocksize(q.numel(), absmax.numel())
        try:
            import bitsandbytes.functional as bnbF
        except ImportError:  # pragma: no cover - a bnb state cannot exist without bitsandbytes
            bnbF = None
        if bnbF is not None:
            v = bnbF.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=blocksize)
            return to_cpu_float32(v).reshape(tuple(shape))
        scale = absmax.float().repeat_interleave(blocksize)[: q.numel()]  # (numel,)
        return (code.float()[q.reshape(-1).long()] * scale).reshape(tuple(shape)).cpu()
    return (code.float()[q.reshape(-1).long()] * state["max2"].float()).reshape(tuple(shape)).cpu()


@torch.no_grad()
def dtensor_rank1_factors(v) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of a sharded ``DTensor`` second moment without gathering it.

    ``r = v.sum(dims 1..).full_tensor()`` (each rank sums its rows, then all-gather, O(m))
    and ``c = v.sum(dim 0).full_tensor()`` (partial sums, then all-reduce, O(n)). Both are
    COLLECTIVES: every rank must call this for the same tensors in the same order.

    Returns:
        ``(r, c)`` float32 on CPU, shapes ``(m,)`` and ``(n,)`` with ``(m, n) = matrix_shape(v.shape)``.
    """
    m, n = matrix_shape(v.shape)
    acc = v.to(torch.float32)
    r = acc.sum(dim=tuple(range(1, acc.ndim))).full_tensor()  # (m,)
    c = acc.sum(dim=0).full_tensor()  # shape[1:]
    return to_cpu_float32(r).reshape(m), to_cpu_float32(c).reshape(n)


@torch.no_grad()
def flat_fragment_rank1_partials(
    fragment: torch.Tensor, start: int, shape: tuple[int, ...] | torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial row and column sums contributed by a flat fragment of ``v``.

    ``fragment`` holds ``v.flatten()[start : start + len(fragment)]`` (one rank's slice under
    ZeRO or FSDP1). Element ``k`` of the flat tensor sits at row ``k // n`` and column
    ``k % n`` of the ``(m, n) = matrix_shape(shape)`` view, so
    ``r_partial[i] = sum_{k in slice, k // n = i} v_k`` and likewise for columns. Summing the
    partials of all ranks (``all_reduce``) gives ``v.sum(1)`` and ``v.sum(0)``.

    Returns:
        ``(r_partial, c_partial)`` float32, shapes ``(m,)`` and ``(n,)``.
    """
    m, n = matrix_shape(shape)
    frag = fragment.detach().reshape(-1).to(torch.float32)
    total = m * n
    frag = frag[: max(0, min(frag.numel(), total - start))]  # drop padding past the tensor's end
    idx = torch.arange(start, start + frag.numel(), device=frag.device)
    r = torch.zeros(m, dtype=torch.float32, device=frag.device).index_add_(0, idx // n, frag)
    c = torch.zeros(n, dtype=torch.float32, device=frag.device).index_add_(0, idx % n, frag)
    return r, c
