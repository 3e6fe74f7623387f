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

A greedy batch also drops its finished rows (a stop string in the response, or the end of
sequence) and goes on with the others from their cache, where one ``generate`` call computes
every row until the last one stops: :meth:`SharedPrefixHFLM._generate_dropping_finished`.
"""

from __future__ import annotations

import inspect

import torch
from lm_eval.models.huggingface import HFLM
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingLayer", "RowStops", "SharedPrefixHFLM", "shared_prefix_layout"]

MIN_PREFIX = 8  # below this, the extra forward pass costs more than it saves
DROP_FRACTION = 4  # drop the finished rows once a 1/DROP_FRACTION of the batch is finished
# generation-config settings greedy search ignores (sampling) or that mean the same in every
# ``generate`` call a generation is split into
GREEDY_SAFE = {
    *("bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "output_attentions", "output_hidden_states"),
    *("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "_from_model_config", "transformers_version"),
}


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

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self._owned():
            return super().batch_select_indices(indices)
        length = self.get_seq_length()
        self._buffers = tuple(buf[indices] for buf in self._buffers)  # one copy, room to grow kept
        self.keys, self.values = (buf[..., :length, :] for buf in self._buffers)

    def reset(self) -> None:
        self._buffers = None
        super().reset()


class RowStops(StoppingCriteria):
    """When a row of a greedy generation is finished, and when to stop for the finished rows to be
    dropped: a row is finished once it generated an end-of-sequence token or its continuation,
    decoded as lm_eval decodes it (special tokens skipped), holds one of the stop strings. lm_eval
    cuts a response at the first stop string, so whatever such a row generates after it is never
    read. The generation is stopped (for :meth:`SharedPrefixHFLM._generate_dropping_finished` to go
    on with the rows still running) once ``enough`` rows are finished, or all of them."""

    def __init__(self, tokenizer, stop: list[str], start: int, eos: set[int], rows: int, enough: int):
        self.tokenizer, self.start, self.eos, self.enough = tokenizer, start, eos, enough
        self.stop = [s for s in stop if s]
        self.done = [False] * rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        running = [i for i, done in enumerate(self.done) if not done]
        texts = self.tokenizer.batch_decode(input_ids[running, self.start :], skip_special_tokens=True)
        last = input_ids[:, -1].tolist()
        for i, text in zip(running, texts):
            self.done[i] = last[i] in self.eos or any(s in text for s in self.stop)
        finished = sum(self.done)
        stop = finished == len(self.done) or finished >= self.enough
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class SharedPrefixHFLM(HFLM):
    """``HFLM`` whose batched generation computes the shared prompt prefix once, and, when greedy,
    drops the rows that finished (module doc)."""

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
            self._autocast(),
        ):
            self.model(input_ids=prefix[None].to(self.device), use_cache=True, **{name: cache})
        cache.batch_repeat_interleave(context.shape[0])
        generation_kwargs[name] = cache
        if self._greedy_only(generation_kwargs, name):
            out = self._generate_dropping_finished(context, max_length, stop, generation_kwargs, name)
        else:
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        out[:, : original.shape[1]] = original  # the prompts as given, then the continuations
        return out

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )

    def _greedy_only(self, generation_kwargs: dict, name: str) -> bool:
        """Whether this generation is plain greedy search, whose finished rows can be dropped: no
        sampling, no other argument, and nothing in the model's generation config that counts from
        where a ``generate`` call starts (a minimum or maximum of new tokens, a suppression at the
        first step) or that this module has not checked (any logits processor): those go through
        lm_eval's own single ``generate`` call."""
        extra = set(generation_kwargs) - {"attention_mask", name, "do_sample", "temperature"}
        greedy = generation_kwargs.get("do_sample") is False or (
            generation_kwargs.get("do_sample") is None and generation_kwargs.get("temperature", 0.0) == 0.0
        )
        settings = set(self.model.generation_config.to_diff_dict()) - GREEDY_SAFE
        return greedy and not extra and not settings

    def _generate_dropping_finished(self, context, max_length: int, stop: list[str], kwargs: dict, name: str):
        """Greedy generation that drops the rows that finished (:class:`RowStops`) and goes on with
        the others from their cache, so a batch no longer computes rows already answered (8% of the
        benchmark's evaluation time, README "Quality"). Each row's tokens, up to where it
        finished, are what one ``generate`` call gives it (the same greedy steps on the same inputs;
        only the batch holding them shrinks); after it, padding."""
        cache, mask = kwargs[name], kwargs["attention_mask"]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad_id = self.tokenizer.pad_token_id
        out = torch.full((context.shape[0], max_length), pad_id, dtype=context.dtype, device=context.device)
        rows = torch.arange(context.shape[0], device=context.device)
        ids, start = context, context.shape[1]
        self.last_batches = []  # the rows of each generate call (for tests and diagnostics)
        while True:
            self.last_batches.append(len(rows))
            stops = RowStops(self.tokenizer, stop, start, eos, len(rows), max(len(rows) // DROP_FRACTION, 1))
            with self._autocast():
                ids = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_length=max_length,
                    stopping_criteria=StoppingCriteriaList([stops]),
                    pad_token_id=pad_id,
                    use_cache=True,
                    do_sample=False,
                    **{name: cache},
                )
            out[rows, : ids.shape[1]] = ids
            running = torch.tensor([not d for d in stops.done], device=ids.device)
            if ids.shape[1] >= max_length or not running.any():
                return out
            # generate leaves its last token uncached, for the next call to feed
            if cache.get_seq_length() != ids.shape[1] - 1:
                raise RuntimeError(f"generate left {cache.get_seq_length()} positions cached for {ids.shape[1]} tokens")
            keep = running.nonzero().flatten()
            grown = torch.ones((mask.shape[0], ids.shape[1] - mask.shape[1]), dtype=mask.dtype, device=mask.device)
            rows, ids, mask = rows[keep], ids[keep], torch.cat([mask, grown], dim=1)[keep]
            cache.batch_select_indices(keep)
