"""Train the tiny Llama with Trainer + OTACallback; under torchrun this is DDP (gloo, CPU).

    torchrun --nproc_per_node 2 tests/dist_scripts/ddp_train.py OUT 2   # 2 ranks x batch 2
    python tests/dist_scripts/ddp_train.py OUT 4                         # 1 process x batch 4

Writes OUT/ota/moments.safetensors (full) and OUT/state_rank{R}.pt (the optimizer's
exp_avg_sq per saved name, read by the script from each rank's optimizer).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import leave, record_writers, tiny_dataset, tiny_model  # noqa: E402


def main() -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from ota_trainer.capture import OTACallback, named_trainable_parameters

    out, batch = Path(sys.argv[1]), int(sys.argv[2])
    rank = int(os.environ.get("RANK", 0))
    record_writers(str(out.parent / f"{out.name}.writers"))
    args = TrainingArguments(
        str(out),
        max_steps=3,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="steps",
        save_steps=3,
        logging_steps=100,
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential",
        ddp_backend="gloo" if "RANK" in os.environ else None,
    )
    model = tiny_model(tie=True)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=[OTACallback("full")])
    trainer.train()
    opt = trainer.optimizer.optimizer
    params, _ = named_trainable_parameters(trainer.model)
    state = {p.name: opt.state[p.param]["exp_avg_sq"].detach().clone() for p in params}
    torch.save({"state": state, "world_size": args.world_size}, out / f"state_rank{rank}.pt")


if __name__ == "__main__":
    main()
    leave()
