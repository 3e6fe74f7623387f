"""LoRA capture under several processes (2 gloo ranks), as the truth test: the adapted base
weights train too (AdamW on everything, no clipping), so the optimizer holds exp_avg_sq of each
W, and the exact estimator's factors must equal its row and column sums.

    torchrun --nproc_per_node 2 tests/dist_scripts/lora_capture.py ddp OUT     # Trainer + OTACallback: DDP
    torchrun --nproc_per_node 2 tests/dist_scripts/lora_capture.py fsdp2 OUT   # fully_shard + LoraCurvature

Writes OUT/ota/moments.safetensors (ddp: the callback, rank 0; fsdp2: this script, rank 0, from
LoraCurvature.factors()) and OUT/reference.pt: each adapted weight's exp_avg_sq row and column
sums read from the optimizer (fsdp2: reduced over the shards with DTensor.full_tensor()).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import leave, record_writers, tiny_dataset, tiny_model  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
PREFIX = "base_model.model."


def lora_model():
    import peft

    pm = peft.get_peft_model(
        tiny_model(tie=True), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    )
    for n, p in pm.named_parameters():
        if n.endswith("base_layer.weight"):
            p.requires_grad_(True)
    return pm


def reference(model, opt) -> dict[str, tuple]:
    """{base weight name: (row sums, col sums)} of the optimizer's exp_avg_sq (collective under FSDP2)."""
    from torch.distributed.tensor import DTensor

    ref = {}
    for name, p in model.named_parameters():  # the same order on every rank
        if not name.endswith("base_layer.weight"):
            continue
        v = opt.state[p]["exp_avg_sq"]
        r, c = v.sum(1), v.sum(0)
        if isinstance(v, DTensor):
            r, c = r.full_tensor(), c.full_tensor()
        key = name[len(PREFIX) :].replace(".base_layer.weight", ".weight")
        ref[key] = (r.detach().clone(), c.detach().clone())
    return ref


def ddp(out: Path) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from ota_trainer.capture import OTACallback

    args = TrainingArguments(
        str(out),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=100,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo",
    )
    trainer = Trainer(model=lora_model(), args=args, train_dataset=tiny_dataset(), callbacks=[OTACallback()])
    trainer.train()
    if int(os.environ["RANK"]) == 0:
        torch.save(
            {"ref": reference(trainer.model, trainer.optimizer.optimizer), "world": args.world_size},
            out / "reference.pt",
        )


def fsdp2(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from ota_trainer.capture.lora import LoraCurvature
    from ota_trainer.moments.format import save_moments

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = lora_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert isinstance(model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight, DTensor)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lc = LoraCurvature(model, 0.999, estimator="exact", accumulate=True)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        lc.step()  # before the optimizer step, as the callback's on_pre_optimizer_step
        opt.step()
        opt.zero_grad()
    ref = reference(model, opt)
    factors = lc.factors()
    if rank == 0:
        save_moments(out, factors, compression="rank1", metadata={"base_model": "tiny", **lc.metadata(model)})
        torch.save({"ref": ref, "world": dist.get_world_size()}, out / "reference.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    record_writers(str(out.parent / f"{out.name}.writers"))
    {"ddp": ddp, "fsdp2": fsdp2}[mode](out)
    leave()
