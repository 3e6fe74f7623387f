"""lm_eval's HF model with the batch's shared prompt prefix computed once.

Every prompt of a chat model starts with the same chat-template head (SmolLM2's default system
prompt and ``<|im_start|>user``: ~20 of the benchmark's 37-65 prompt tokens), often followed by
the same instruction. lm_eval's HF backend runs that head through the model once per prompt.
:class:`SharedPrefixHFLM` runs it once per batch, at batch size one, and hands the generation the
cache of it, repeated over the batch. Each row's own tokens are moved right against the end
(``[shared head][padding][own tokens]``, the padding masked out); positions come from the
attention mask, so every real token keeps the position it has in lm_eval's left-padded layout.

Measured on SmolLM2-135M-Instruct, fp32, 2 cores (Intel Xeon, Sapphire Rapids class, AVX-512),
greedy, through lm_eval, the 750 dev prompts of the benchmark (a five-way merge), twice each:
lm_eval's own ``hf`` model at batch 32 71.8-77.9 s; this one at batch 64 48.2-50.1 s, at batch
128 44.5-45.7 s; the same 750 scores in all three. The same numbers summed in another order can
round differently in the last bit, so a near tie between two tokens could in principle resolve
the other way; tests/test_quality_bench.py checks that both generate the same tokens.
"""

from __future__ import annotations

import inspect

import torch
from lm_eval.models.huggingface import HFLM
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingLayer", "SharedPrefixHFLM", "shared_prefix_layout"]

MIN_PREFIX = 8  # below this, the extra forward pass costs more than it saves


def shared_prefix_layout(
    ids: torch.Tensor, mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For a left-padded batch (``ids``, ``mask``: [B, T]): the longest prefix every row starts
    with (keeping at least one own token per row), and the batch re-laid as ``[prefix][padding]
    [own tokens]`` with its mask; ``None`` when that prefix is shorter than ``MIN_PREFIX``."""
    lengths = mask.sum(dim=1)
    width = ids.shape[1]
    rows = [ids[i, width - int(n) :] for i, n in enumerate(lengths)]
    prefix = rows[0][: int(lengths.min()) - 1]
    for row in rows[1:]:
        differ = (row[: len(prefix)] != prefix).nonzero()
        if len(differ):
            prefix = prefix[: int(differ[0])]
    if len(prefix) < MIN_PREFIX:
        return None
    p = len(prefix)
    new_ids = torch.full_like(ids, pad_id)
    new_mask = torch.zeros_like(mask)
    new_ids[:, :p], new_mask[:, :p] = prefix, 1
    for i, row in enumerate(rows):
        own = row[p:]
        new_ids[i, width - len(own) :], new_mask[i, width - len(own) :] = own, 1
    return prefix, new_ids, new_mask


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of a buffer with room to grow: a step
    writes its new positions into the buffer, where ``DynamicLayer`` concatenates the whole cache
    again (``torch.cat`` was ~9% of the benchmark's generation time: 4.5 of 51 s on the 750 dev
    prompts of a five-way merge, Intel Xeon, Sapphire Rapids class, 2 cores). The values attention
    reads are the same numbers in the same order; only their memory is reused. Anything that
    replaces ``keys`` (``batch_repeat_interleave``, ``crop``...) is taken into a new buffer at the
    next update."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _owned(self) -> bool:
        if self._buffers is None:
            return False
        buf = self._buffers[0]
        return (
            self.keys.data_ptr() == buf.data_ptr()
            and self.keys.stride() == buf.stride()
            and self.keys.shape[:2] == buf.shape[:2]
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        end = length + new
        if not self._owned() or self._buffers[0].shape[-2] < end:
            capacity = max(2 * end, 64)  # doubling: a generation copies its cache a few times, not once a step
            old = (self.keys, self.values) if length else (None, None)
            self._buffers = tuple(
                torch.empty((*s.shape[:-2], capacity, s.shape[-1]), dtype=s.dtype, device=s.device)
                for s in (key_states, value_states)
            )
            for buf, o in zip(self._buffers, old):
                if o is not None:
                    buf[..., :length, :] = o
        for buf, s in zip(self._buffers, (key_states, value_states)):
            buf[..., length:end, :] = s
        self.keys, self.values = (buf[..., :end, :] for buf in self._buffers)
        return self.keys, self.values

    def reset(self) -> None:
        self._buffers = None
        super().reset()


class SharedPrefixHFLM(HFLM):
    """``HFLM`` whose batched generation computes the shared prompt prefix once (module doc)."""

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        from transformers import DynamicCache

        mask = generation_kwargs.get("attention_mask")
        pad_id = self.tokenizer.pad_token_id
        layout = None
        if self.backend == "causal" and mask is not None and pad_id is not None:
            layout = shared_prefix_layout(context, mask, pad_id)
        if layout is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        original = context
        prefix, context, generation_kwargs["attention_mask"] = layout
        # transformers 5 names the argument `cache` (`past_key_values` before, deprecated since)
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56 builds it without the config
            cache = DynamicCache()
        if getattr(cache, "layers", None) and all(type(layer) is DynamicLayer for layer in cache.layers):
            cache.layers = [GrowingLayer() for _ in cache.layers]
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            self.model(input_ids=prefix[None].to(self.device), use_cache=True, **{name: cache})
        cache.batch_repeat_interleave(context.shape[0])
        generation_kwargs[name] = cache
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        out[:, : original.shape[1]] = original  # the prompts as given, then the continuations
        return out
