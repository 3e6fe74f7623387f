"""LoRA capture (#17): OTACallback on a PEFT LoRA model estimates the curvature of the frozen
weights (what Adam's exp_avg_sq would hold for W), stores it under the base weights' names,
and the adapters merge with ota from the Hub."""

from __future__ import annotations

import pytest
import torch
from dist_scripts._common import tiny_dataset, tiny_model
from safetensors import safe_open

from ota_trainer.capture import OTACallback
from ota_trainer.moments.format import load_moments, moments_path

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


def _lora_model(train_base: bool):
    model = tiny_model(tie=True)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    if train_base:  # the truth test: the adapted weights train too, so Adam holds exp_avg_sq for W
        for n, p in pm.named_parameters():
            if n.endswith("base_layer.weight"):
                p.requires_grad_(True)
    return pm


def _train(tmp_path, estimator: str, *, train_base: bool, accum: int = 2, steps: int = 4, save_steps: int = 0, **ota):
    """A Trainer run of the tiny LoRA model with OTACallback(lora_estimator=estimator, **ota) into
    tmp_path/<estimator>; checkpoints every ``save_steps`` steps (0: none)."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = _lora_model(train_base)
    args = TrainingArguments(
        str(tmp_path / estimator),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accum,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=100,
        disable_tqdm=True,
        seed=0,
    )
    callback = OTACallback(lora_estimator=estimator, **ota)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=[callback])
    trainer.train()
    return trainer, tmp_path / estimator


def _factors(folder):
    with safe_open(str(moments_path(folder)), "pt") as f:
        names = {k.split("::")[0] for k in f.keys()}
        return {n: (f.get_tensor(n + "::row"), f.get_tensor(n + "::col")) for n in names}


@pytest.mark.parametrize("accum", [1, 2])
def test_exact_estimator_equals_adams_own_second_moment_of_w(tmp_path, accum):
    """With W trained too (Adam on everything, no clipping), the exact estimator's factors are
    the row and column sums of Adam's exp_avg_sq for W, to float32 rounding; with gradient
    accumulation the accumulated gradient is squared, as Adam does."""
    trainer, out = _train(tmp_path, "exact", train_base=True, accum=accum)
    got = _factors(out)
    named = dict(trainer.model.named_parameters())
    assert len(got) == 2 * 2  # q_proj, v_proj of two layers, under the base weights' names
    for name, (row, col) in got.items():
        assert name.startswith("model.layers.") and name.endswith(("q_proj.weight", "v_proj.weight"))
        module = name[: -len(".weight")]
        v = trainer.optimizer.state[named[f"base_model.model.{module}.base_layer.weight"]]["exp_avg_sq"]
        torch.testing.assert_close(row, v.sum(1), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(col, v.sum(0), rtol=1e-5, atol=1e-12)
    meta = load_moments(out).metadata
    assert meta["capture"] == "lora" and meta["lora_estimator"] == "exact" and meta["step"] == 4
    assert meta["lora"]["r"] == 4 and meta["lora"]["target_modules"] == sorted(TARGETS)
    assert meta["beta2"] == pytest.approx(0.999)


@pytest.mark.parametrize("estimator", ["exact", "factored"])
def test_estimators_follow_their_formulas(estimator):
    """One step by hand: the layer's output gradient and input read with autograd, independently
    of the capture's hooks; exact: row/column sums of (1-b2) G*G with G = delta^T X; factored:
    (1-b2) a sum(c) and (1-b2) c sum(a) with a = sum_t delta^2, c = sum_t x^2 / T."""
    from ota_trainer.capture.lora import LoraCurvature

    torch.manual_seed(0)
    pm = _lora_model(False)
    lc = LoraCurvature(pm, 0.9, estimator=estimator)
    module = pm.base_model.model.model.layers[1].self_attn.v_proj
    seen = {}

    def keep(mod, args, out):
        out.retain_grad()
        seen["x"], seen["out"] = args[0].detach(), out

    h = module.register_forward_hook(keep)
    ids = tiny_dataset(n=4)["input_ids"]
    batch = torch.tensor(ids)
    pm(input_ids=batch, labels=batch).loss.backward()
    h.remove()
    lc.step()
    d = seen["out"].grad.reshape(-1, seen["out"].shape[-1]).double()
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    if estimator == "exact":
        g2 = (d.T @ x) ** 2
        want_r, want_c = 0.1 * g2.sum(1), 0.1 * g2.sum(0)
    else:
        a, c = (d * d).sum(0), (x * x).sum(0) / x.shape[0]
        want_r, want_c = 0.1 * a * c.sum(), 0.1 * c * a.sum()
    layer = next(x for x in lc.layers if x.name == "model.layers.1.self_attn.v_proj.weight")
    torch.testing.assert_close(layer.row, want_r, rtol=1e-4, atol=1e-14)
    torch.testing.assert_close(layer.col, want_c, rtol=1e-4, atol=1e-14)
    lc.remove()


def test_sft_lora_adapters_pushed_to_the_hub_merge_with_ota(local_hub, tmp_path):
    """The done-when story: TRL SFTTrainer + LoraConfig + OTACallback(), pushed to the loopback
    Hub, merged from the repo ids with ota."""
    from datasets import Dataset
    from huggingface_hub import HfApi
    from trl import SFTConfig, SFTTrainer

    from ota_trainer.cli.merge import main
    from ota_trainer.hub import publish_folder
    from ota_trainer.testing.tiny import make_tiny_base, make_tiny_tokenizer

    base = make_tiny_base(tmp_path / "base", seed=0)
    tok = make_tiny_tokenizer(base)
    publish_folder(base, "org/lbase")
    for i, task in enumerate(("add", "mul")):
        from transformers import AutoModelForCausalLM

        data = Dataset.from_dict({"text": [f"{a} {task} {b}" for a in range(8) for b in range(4)]})
        args = SFTConfig(
            str(tmp_path / task),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_steps=100,
            disable_tqdm=True,
            max_length=32,
            seed=i,
            push_to_hub=True,
            hub_model_id=f"org/lora-{task}",
        )
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(base),
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
            callbacks=[OTACallback()],
        )
        trainer.train()
        trainer.push_to_hub()
        files = set(HfApi().list_repo_files(f"org/lora-{task}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "ota/moments.safetensors"} <= files
    out = tmp_path / "merged"
    assert (
        main(
            [
                "--base",
                "org/lbase",
                "--expert",
                "org/lora-add",
                "org/lora-mul",
                "--method",
                "ota",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    b = AutoModelForCausalLM.from_pretrained(base).state_dict()
    m = merged.state_dict()
    adapted = [k for k in b if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert any(not torch.equal(m[k], b[k]) for k in adapted)  # the adapters' kept edits
    assert all(torch.equal(m[k], b[k]) for k in b if k not in adapted)  # no edit elsewhere: the base


@pytest.mark.parametrize("estimator", ["exact", "factored"])
def test_a_capture_schedule_weighs_each_captured_step_as_adam_would(estimator):
    """One step in 3 of the last 7 of 10: each captured step's g^2 stands for the steps since the
    previous capture (and the last one for the steps after it), with Adam's weights, and the
    factors are scaled so that the merger's correction 1/(1 - b2^T) is the window's. The steps'
    own g^2 come from a second, independent capture with beta2 = 0 (every step, no window)."""
    from ota_trainer.capture.lora import LoraCurvature

    torch.manual_seed(0)
    pm = _lora_model(False)
    b, total, every, window = 0.9, 10, 3, 7
    lc = LoraCurvature(pm, b, estimator=estimator, every=every, window=window, total_steps=total)
    each = LoraCurvature(pm, 0.0, estimator=estimator)  # row = that step's g^2 row sums
    name = "model.layers.1.self_attn.v_proj.weight"
    g2, saved = {}, {}
    ids = torch.tensor(tiny_dataset(n=4)["input_ids"])
    for t in range(1, total + 1):
        batch = ids.roll(t, dims=1)
        pm(input_ids=batch, labels=batch).loss.backward()
        pm.zero_grad()
        lc.step()
        each.step()
        g2[t] = next(x for x in each.layers if x.name == name).row.clone()
        if t in (5, 8, total):
            saved[t] = lc.factors()[name].row.double()
    assert lc.captured == 3 and lc.steps == total
    t0 = total - window
    captured = [t for t in range(t0 + 1, total + 1) if (total - t) % every == 0]
    assert captured == [4, 7, 10]
    for T, got in saved.items():
        want, prev = torch.zeros_like(g2[1]), t0
        caps = [s for s in captured if s <= T]
        for j, s in enumerate(caps):
            end = T if j == len(caps) - 1 else s  # the last capture also stands for the steps after it
            want += (b ** (T - end) - b ** (T - prev)) * g2[s]
            prev = s
        want *= (1 - b**T) / (1 - b ** (T - t0))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-14)
    meta = lc.metadata(pm)
    assert (meta["lora_every"], meta["lora_window"], meta["lora_captured_steps"], meta["step"]) == (3, 7, 3, 10)
    lc.remove()
    each.remove()


def test_capture_schedule_errors_and_checkpoints_before_the_window(tmp_path):
    """A checkpoint saved before the window holds no curvature (and training goes on); a schedule
    that can never fire, or a bad value, is refused before training starts."""
    from ota_trainer.errors import ConfigError

    for bad in ({"lora_every": 0}, {"lora_every": 1.5}, {"lora_window": 0}, {"lora_window": True}):
        with pytest.raises(ConfigError, match="LoRA capture"):
            OTACallback(**bad)

    with pytest.raises(ConfigError, match="never fires"):
        _train(tmp_path, "exact", train_base=False, accum=1, lora_every=5)
    # captures steps 2 and 4
    _, out = _train(tmp_path, "factored", train_base=False, accum=1, save_steps=1, lora_every=2, lora_window=3)
    assert not moments_path(out / "checkpoint-1").exists()
    for step in (2, 3, 4):
        meta = load_moments(out / f"checkpoint-{step}").metadata
        assert meta["lora_captured_steps"] == (1 if step < 4 else 2) and meta["step"] == step
    assert load_moments(out).metadata["lora_window"] == 3


def test_qlora_4bit_base_layers_are_estimated_at_their_real_shape():
    """QLoRA: the adapted layers are bitsandbytes 4-bit linears, whose weight is stored packed
    ((n, 1) bytes); the estimate has the layer's (out, in) shape and follows its formula."""
    bnb = pytest.importorskip("bitsandbytes")
    from ota_trainer.capture.lora import LoraCurvature

    torch.manual_seed(0)
    model = tiny_model(tie=True)
    for layer in model.model.layers:
        for name in TARGETS:
            old = getattr(layer.self_attn, name)
            q = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=torch.float32)
            q.weight = bnb.nn.Params4bit(old.weight.data.clone(), requires_grad=False, quant_type="fp4")
            setattr(layer.self_attn, name, q.to("cpu"))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    module = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert module.base_layer.weight.shape != (module.base_layer.out_features, module.base_layer.in_features)
    lc = LoraCurvature(pm, 0.5, estimator="exact")
    seen = {}

    def keep(mod, args, out):
        out.retain_grad()
        seen["x"], seen["out"] = args[0].detach(), out

    h = module.register_forward_hook(keep)
    batch = torch.tensor(tiny_dataset(n=4)["input_ids"])
    pm(input_ids=batch, labels=batch).loss.backward()
    h.remove()
    lc.step()
    d = seen["out"].grad.reshape(-1, seen["out"].shape[-1]).double()
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    g2 = (d.T @ x) ** 2
    got = lc.factors()["model.layers.0.self_attn.q_proj.weight"]
    assert got.shape == (module.base_layer.out_features, module.base_layer.in_features)
    torch.testing.assert_close(got.row.double(), 0.5 * g2.sum(1), rtol=1e-4, atol=1e-14)
    torch.testing.assert_close(got.col.double(), 0.5 * g2.sum(0), rtol=1e-4, atol=1e-14)
    lc.remove()
