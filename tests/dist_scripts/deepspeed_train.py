"""DeepSpeed ZeRO capture: Trainer + OTACallback under ZeRO stage 1, 2 or 3 on 2 gloo ranks (CPU).

    torchrun --nproc_per_node 2 tests/dist_scripts/deepspeed_train.py OUT STAGE

OTACallback writes rank-one moments (row/column sums reduced from each rank's fragment) to
OUT/ota/ and OUT/checkpoint-3/ota/; the script then writes full moments to OUT/full/ota/
with ``save_optimizer_moments`` and dumps the reference OUT/reference.pt: each parameter's
exp_avg_sq assembled by ``deepspeed.utils.safe_get_full_optimizer_state`` (called by this
script, in named_parameters order on every rank).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import leave, record_writers, tiny_dataset, tiny_model  # noqa: E402


def main() -> None:
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state
    from transformers import Trainer, TrainingArguments

    from ota_trainer.capture import OTACallback, named_trainable_parameters, save_optimizer_moments

    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    record_writers(str(out.parent / f"{out.name}.writers"))
    ds_config = {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    args = TrainingArguments(
        str(out),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=False,
        bf16=False,
        report_to=[],
        save_strategy="steps",
        save_steps=3,
        logging_steps=100,
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential",
        deepspeed=ds_config,
        ddp_backend="gloo",
        optim="adamw_torch",
        save_only_model=True,
    )
    model = tiny_model(tie=True)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)  # a frozen parameter
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=[OTACallback("rank1")])
    trainer.train()
    trainer.save_model()
    save_optimizer_moments(out / "full", trainer.model, trainer.optimizer, compression="full")
    params, _ = named_trainable_parameters(trainer.model)
    ref = {
        p.name: safe_get_full_optimizer_state(p.param, "exp_avg_sq").detach().cpu().clone().reshape(p.shape)
        for p in params
    }
    if dist.get_rank() == 0:
        torch.save({"state": ref, "stage": stage}, out / "reference.pt")


if __name__ == "__main__":
    main()
    leave()  # (DeepSpeed's CPU comm op can abort in its C++ teardown at interpreter exit)
