"""Tiny random models, experts and moments for tests, benchmarks and the offline smoke demo.

Everything is built from a config with a seed: nothing is downloaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..moments.format import save_moments

__all__ = ["tiny_llama_config", "make_tiny_base", "make_tiny_expert"]


def tiny_llama_config(
    *, hidden: int = 64, layers: int = 2, vocab: int = 128, tie: bool = True, heads: int = 4, kv_heads: int = 2
):
    """A LlamaConfig of a few hundred thousand parameters."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )


def make_tiny_base(
    path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs
) -> Path:
    """Save a randomly initialised tiny ``LlamaForCausalLM`` to ``path``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs)).to(dtype)
    model.save_pretrained(path)
    return Path(path)


@torch.no_grad()
def make_tiny_expert(
    base: str | os.PathLike,
    path: str | os.PathLike,
    *,
    seed: int,
    scale: float = 0.02,
    moments: str | None = "rank1",
    step: int = 100,
    beta2: float = 0.999,
) -> Path:
    """An "expert": the base plus a random task vector, with random positive second moments.

    Moments are ``exp(N(-20, 2))``-distributed (Adam-like magnitudes spanning many orders),
    written with :func:`ota_trainer.save_moments` when ``moments`` is ``"rank1"`` or ``"full"``.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    g = torch.Generator().manual_seed(seed)
    v = {}
    for name, p in model.named_parameters():
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
        v[name] = _exp(torch.randn(p.shape, generator=g) * 2.0 - 20.0)
    model.save_pretrained(path)
    if moments is not None:
        save_moments(
            path,
            v,
            compression=moments,
            metadata={"optimizer": "adamw_torch", "beta2": beta2, "step": step, "base_model": str(base)},
        )
    return Path(path)


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``exp`` of each entry by the C library, in float64: the same bits on every x86 CPU.
    PyTorch's vectorised float32 ``exp`` gives AVX-512 and AVX2 machines different last bits (so
    the moments, and the pinned hashes of merges of them, changed from machine to machine); in
    float64 the moments' rank-one sums are rounded to float32 only once, after any summation
    order."""
    return torch.tensor([math.exp(t) for t in x.flatten().tolist()], dtype=torch.float64).reshape(x.shape)


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(path: str | os.PathLike):
    """A character-level chat tokenizer (~100 tokens, fits a vocab of 128), saved to ``path``.

    Printable ASCII characters are tokens; ``<|im_start|>``, ``<|im_end|>`` and ``<pad>`` are
    special. The chat template is ChatML, like SmolLM2's.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast
