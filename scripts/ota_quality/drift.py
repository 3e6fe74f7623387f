"""How far a merge drifts from its base: the mean per-token KL(base || merge) on the base's own
greedy continuations of general prompts (the forgetting set's questions).

The base's continuations and its log-probabilities at those positions are computed once
(:class:`BaseReference`); each model then needs one batched forward pass per chunk of sequences.
"""

from __future__ import annotations

import os

__all__ = ["BaseReference"]


class BaseReference:
    """The base's greedy continuations of ``prompts`` (``max_new_tokens`` each) and its
    log-probabilities there, for :meth:`kl`."""

    def __init__(self, base: str | os.PathLike, prompts: list[str], *, max_new_tokens: int = 16, batch_size: int = 32):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = tok = AutoTokenizer.from_pretrained(base)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.batch_size = batch_size
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.batches = []  # (input_ids, attention_mask, index of the first continuation token)
        for start in range(0, len(prompts), batch_size):
            texts = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts[start : start + batch_size]
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            mask = torch.cat([enc["attention_mask"], torch.ones_like(ids[:, enc["input_ids"].shape[1] :])], dim=1)
            self.batches.append((ids, mask, enc["input_ids"].shape[1]))
        self.base_logp = [self._logp(model, b) for b in self.batches]

    @staticmethod
    def _logp(model, batch):
        import torch

        ids, mask, start = batch
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, start - 1 : -1].float()
        return torch.log_softmax(logits, dim=-1)

    def kl(self, folder: str | os.PathLike) -> float:
        """Mean over continuation tokens of KL(base || model at ``folder``), in nats."""
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        total, count = 0.0, 0
        for batch, p in zip(self.batches, self.base_logp):
            q = self._logp(model, batch)
            total += float((p.exp() * (p - q)).sum(-1).sum())
            count += p.shape[0] * p.shape[1]
        return total / max(count, 1)
