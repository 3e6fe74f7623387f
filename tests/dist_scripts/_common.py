"""Shared pieces of the multi-process capture scripts (run under torchrun, not collected by pytest)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


def tiny_model(*, tie: bool = True, seed: int = 0):
    from transformers import LlamaForCausalLM

    from ota_trainer.testing.tiny import tiny_llama_config

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tie=tie))


def tiny_dataset(n: int = 32, seq: int = 16, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, seq), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def record_writers(path: str) -> None:
    """Append this process's rank to ``path`` whenever the capture stage writes a moments file."""
    import ota_trainer.capture.core as core

    original = core.save_moments

    def recording(folder, moments, **kw):
        with open(path, "a") as f:
            f.write(f"{int(os.environ.get('RANK', 0))}\n")
        return original(folder, moments, **kw)

    core.save_moments = recording


def leave() -> None:
    """Finish the collectives and exit without the interpreter's teardown. A rank can abort in a
    communication backend's C++ teardown at interpreter exit ("terminate called without an active
    exception": DeepSpeed's CPU comm op once in ~10 runs; a gloo DDP rank of the Trainer once in
    CI) after all its work is done and written; the test then fails on exit code -6 alone."""
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
