"""MoE models (#16 §1): transformers 5 holds Mixtral's and Qwen2-MoE's experts fused
(``mlp.experts.gate_up_proj``) and saves them per expert; the moments follow the weights
through the same conversion, so experts trained with OTACallback merge with ``ota``."""

from __future__ import annotations

import logging

import pytest
import torch
from dist_scripts._common import tiny_dataset

from ota_trainer import merge, save_ffg_histogram
from ota_trainer.capture import OTACallback, check_moments_cover_weights
from ota_trainer.moments.format import load_moments

VOCAB = 128


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
        num_experts_per_tok=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(cfg)


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=3,
        num_experts_per_tok=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return Qwen2MoeForCausalLM(cfg)


# the fused tensors and how each expert's saved weights are cut from them (dim 1 of gate_up: [gate; up])
FAMILIES = {
    "mixtral": (_mixtral, "block_sparse_moe.experts.{e}.{w}.weight", ("w1", "w3", "w2")),
    "qwen2_moe": (_qwen2_moe, "mlp.experts.{e}.{w}.weight", ("gate_proj", "up_proj", "down_proj")),
}


def _train(family, base, out, seed, caplog, compression="rank1", save_steps=None):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = TrainingArguments(
        str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=100,
        disable_tqdm=True,
        seed=seed,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=tiny_dataset(seed=seed), callbacks=[OTACallback(compression=compression)]
    )
    with caplog.at_level(logging.WARNING, logger="ota_trainer"):
        trainer.train()
        trainer.save_model(str(out))
    return trainer


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = {}
    for family, (make, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        out[family] = tmp_path_factory.mktemp(family) / "base"
        make().save_pretrained(out[family])
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_moe_moments_follow_the_saved_experts_and_merge_with_ota(family, bases, tmp_path, caplog):
    make, pattern, (gate, up, down) = FAMILIES[family]
    experts = []
    for seed in (1, 2):
        out = tmp_path / f"e{seed}"
        # seed 2 also saves a checkpoint: OTACallback compares its moments with the saved weights there
        trainer = _train(
            family,
            bases[family],
            out,
            seed,
            caplog,
            compression="full" if seed == 1 else "rank1",
            save_steps=None if seed == 1 else 2,
        )
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        assert check_moments_cover_weights(out) == []  # every saved weight has moments, no other name
        # experts fused in memory, saved per expert: the FFG histogram is counted from the files
        assert not (out / "ota" / "ffg_histogram.safetensors").exists()
        assert save_ffg_histogram(out, bases[family]).is_file()
        experts.append(out)
        if seed != 1:
            continue
        moments = load_moments(out)
        state = trainer.optimizer.state
        named = dict(trainer.model.named_parameters())
        for layer in range(2):
            prefix = f"model.layers.{layer}."
            gu = state[named[prefix + "mlp.experts.gate_up_proj"]]["exp_avg_sq"]  # (E, 2I, H)
            dn = state[named[prefix + "mlp.experts.down_proj"]]["exp_avg_sq"]  # (E, H, I)
            inter = gu.shape[1] // 2
            for e in range(gu.shape[0]):
                by_hand = {gate: gu[e, :inter], up: gu[e, inter:], down: dn[e]}
                for w, v in by_hand.items():
                    assert torch.equal(moments[prefix + pattern.format(e=e, w=w)], v), (layer, e, w)
            router = prefix + ("block_sparse_moe.gate.weight" if family == "mixtral" else "mlp.gate.weight")
            assert torch.equal(moments[router], state[named[prefix + "mlp.gate.weight"]]["exp_avg_sq"])

    report = merge(
        {"method": "ota", "base_model": str(bases[family]), "models": [str(e) for e in experts]},
        tmp_path / "merged",
        quiet=True,
    )
    assert all(e.grafted and 0 < e.density < 1 for e in report.experts)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)
    saved = set(load_moments(experts[1]).shapes)
    assert any(".experts.2." in n for n in saved) and not any("gate_up_proj" in n for n in saved)
