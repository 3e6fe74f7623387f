"""FSDP2 capture: shard the tiny Llama with ``fully_shard`` on 2 gloo ranks, run a few AdamW
steps, call the capture function on every rank, and dump the reference state.

    torchrun --nproc_per_node 2 tests/dist_scripts/fsdp2_capture.py OUT

Writes OUT/rank1/ota/moments.safetensors and OUT/full/ota/moments.safetensors (written by
rank 0 only), and OUT/reference.pt: each parameter's exp_avg_sq gathered by this script with
``DTensor.full_tensor()`` and its local shard shapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import leave, record_writers, tiny_model  # noqa: E402


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from ota_trainer.capture import save_optimizer_moments

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    record_writers(str(out.parent / f"{out.name}.writers"))
    model = tiny_model(tie=True)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)  # a frozen parameter
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in data-parallel training
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert isinstance(model.model.layers[1].mlp.up_proj.weight, DTensor)
    meta = {"base_model": "tiny"}
    r1 = save_optimizer_moments(out / "rank1", model, opt, compression="rank1", metadata=meta)
    full = save_optimizer_moments(out / "full", model, opt, compression="full", metadata=meta)
    assert (r1 is None) == (rank != 0) and (full is None) == (rank != 0)
    ref, local = {}, {}
    for name, p in model.named_parameters():  # same order on every rank: full_tensor() is collective
        if not p.requires_grad:
            continue
        v = opt.state[p]["exp_avg_sq"]
        ref[name] = v.full_tensor().detach().clone()
        local[name] = tuple(v.to_local().shape)
    if rank == 0:
        torch.save({"state": ref, "local_shapes": local, "step": 3}, out / "reference.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
