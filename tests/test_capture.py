"""Capture stage (ota_trainer.capture): pure math, naming, and OTACallback in real Trainer runs.

Every Trainer test trains a tiny random Llama for a few steps on CPU and compares what was
written with the optimizer state read by the test itself.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
from dist_scripts._common import tiny_dataset, tiny_model  # noqa: E402  (shared with the multi-process scripts)
from safetensors import safe_open
from transformers import TrainerCallback

from ota_trainer.capture import (
    MERGE_READY_TAG,
    OTACallback,
    adafactor_rank1_factors,
    adafactor_second_moment,
    check_moments_cover_weights,
    clean_parameter_name,
    dequantize_bnb_state2,
    flat_fragment_rank1_partials,
    inspect_optimizer,
    named_trainable_parameters,
    save_optimizer_moments,
)
from ota_trainer.capture.tensors import bnb_blockwise_blocksize
from ota_trainer.errors import CaptureError, ConfigError, OTAError
from ota_trainer.moments.compress import rank1_factors
from ota_trainer.moments.format import load_moments, moments_path


def train_args(out: Path, **kw):
    from transformers import TrainingArguments

    base = dict(
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to=[],  # gradient checkpointing is off by default in TrainingArguments
        save_strategy="steps",
        save_steps=2,
        logging_steps=100,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(str(out), **base)


def make_trainer(
    out: Path, *, callback: OTACallback, model=None, tie: bool = True, train_dataset=None, eval_dataset=None, **kw
):
    from transformers import Trainer

    model = model if model is not None else tiny_model(tie=tie)
    snap = StateSnapshot()
    trainer = Trainer(
        model=model,
        args=train_args(out, **kw),
        train_dataset=train_dataset or tiny_dataset(),
        eval_dataset=eval_dataset,
        callbacks=[callback, snap],
    )
    trainer.ota_snapshot = snap
    return trainer


def real_optimizer(trainer):
    return trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer -> torch optimizer


def expected_state(optimizer, model) -> dict[str, dict[str, torch.Tensor]]:
    """The raw second-moment state per saved parameter name, read straight from the optimizer."""
    params, _ = named_trainable_parameters(model)
    out = {}
    for p in params:
        st = optimizer.state.get(p.param)
        if st:
            out[p.name] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    return out


def expected_full(state: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """v as the test reads it: exp_avg_sq, or bitsandbytes' state2 dequantized by hand."""
    if "exp_avg_sq" in state:
        return state["exp_avg_sq"].float()
    q = state["state2"]
    if q.dtype != torch.uint8:
        return q.float()
    absmax, code = state["absmax2"], state["qmap2"]
    block = -(-q.numel() // absmax.numel())
    block = 1 << (block - 1).bit_length()  # bitsandbytes block sizes are powers of two
    scale = absmax.repeat_interleave(block)[: q.numel()]
    return (code[q.reshape(-1).long()] * scale).reshape(shape)


def raw_file(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(moments_path(folder)), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_moments_match(folder, state: dict[str, dict[str, torch.Tensor]], *, compression: str, shapes: dict):
    """The file holds exactly the optimizer's v (full) or its row/column sums (rank1)."""
    reader = load_moments(folder)
    raw = raw_file(folder)
    assert set(reader.shapes) == set(state), set(reader.shapes) ^ set(state)
    for name, st in state.items():
        shape = shapes[name]
        stored = reader.metadata["parameters"][name]["stored"]
        if "exp_avg_sq_row" in st:  # Adafactor: means -> sums
            # (written through outer(r, c) / sum(r), whose sums are r and c up to float32 rounding)
            m, n = shape
            assert stored == "rank1"
            torch.testing.assert_close(raw[name + "::row"], st["exp_avg_sq_row"].float() * n, rtol=2e-6, atol=0)
            torch.testing.assert_close(raw[name + "::col"], st["exp_avg_sq_col"].float() * m, rtol=2e-6, atol=0)
            continue
        v = expected_full(st, shape)
        if compression == "rank1" and len(shape) >= 2:
            assert stored == "rank1"
            mat = v.reshape(shape[0], -1)
            assert torch.equal(raw[name + "::row"], mat.sum(dim=1)), name
            assert torch.equal(raw[name + "::col"], mat.sum(dim=0)), name
        else:
            assert stored == "full"
            assert torch.equal(raw[name], v), name


class StateSnapshot(TrainerCallback):
    """Registered after OTACallback: copies the optimizer state at each save (the test's own reading)."""

    def __init__(self):
        self.at_save: dict[int, dict] = {}

    def on_save(self, args, state, control, model=None, optimizer=None, **kw):
        self.at_save[state.global_step] = expected_state(optimizer.optimizer, model)


def shapes_of(model) -> dict[str, tuple[int, ...]]:
    params, _ = named_trainable_parameters(model)
    return {p.name: p.shape for p in params}


def saved_weight_names(folder) -> set[str]:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


# ----------------------------------------------------------------------------------------
# pure tensor functions
# ----------------------------------------------------------------------------------------


def test_adafactor_factors_are_row_and_column_sums_of_adafactors_estimate():
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    b = torch.nn.Parameter(torch.randn(5))
    opt = Adafactor([w, b], lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    for _ in range(3):
        opt.zero_grad()
        ((w * torch.arange(1.0, 6.0)).pow(2).sum() + (w @ torch.randn(5)).pow(3).sum() + b.pow(2).sum()).backward()
        opt.step()
    st = opt.state[w]
    r, c = adafactor_rank1_factors(st["exp_avg_sq_row"], st["exp_avg_sq_col"], w.shape)
    torch.testing.assert_close(r, st["exp_avg_sq_row"] * 5)  # row means * n_cols
    torch.testing.assert_close(c, st["exp_avg_sq_col"] * 6)  # col means * n_rows
    # outer(r, c) / sum(r) is Adafactor's own estimate: the update divides by its square root
    v_hat = torch.outer(r, c) / r.sum()
    approx = Adafactor._approx_sq_grad(st["exp_avg_sq_row"], st["exp_avg_sq_col"])  # = v_hat ** -0.5
    torch.testing.assert_close(v_hat, approx.pow(-2), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        adafactor_second_moment(st["exp_avg_sq_row"], st["exp_avg_sq_col"]), v_hat, rtol=1e-6, atol=0
    )


def test_adafactor_factors_for_more_than_two_dims():
    row = torch.rand(3, 4)  # (..., m) for a (3, 4, 5) tensor
    col = torch.rand(3, 5)
    r, c = adafactor_rank1_factors(row, col, (3, 4, 5))
    dense = adafactor_second_moment(row, col)  # (3, 4, 5)
    er, ec = rank1_factors(dense)
    torch.testing.assert_close(r, er)
    torch.testing.assert_close(c, ec)
    assert r.shape == (3,) and c.shape == (20,)


def test_bnb_blocksize_inference():
    assert bnb_blockwise_blocksize(21000, 83) == 256
    assert bnb_blockwise_blocksize(5000, 20) == 256
    assert bnb_blockwise_blocksize(4096 * 3, 6) == 2048
    assert bnb_blockwise_blocksize(100, 1) == 128
    with pytest.raises(ValueError):
        bnb_blockwise_blocksize(1000, 7)


def test_dequantize_bnb_state2_formula():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (10, 70), dtype=torch.uint8, generator=g)
    code = torch.linspace(0, 1, 256)
    absmax = torch.rand(3, generator=g) + 0.5  # ceil(700 / 256) = 3 blocks
    v = dequantize_bnb_state2({"state2": q, "qmap2": code, "absmax2": absmax}, (10, 70))
    flat = q.reshape(-1).long()
    want = code[flat] * absmax[torch.arange(700) // 256]
    torch.testing.assert_close(v, want.reshape(10, 70))
    fp32 = torch.rand(4, 4)
    assert torch.equal(dequantize_bnb_state2({"state2": fp32}, (4, 4)), fp32)


@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 2)])
def test_flat_fragment_partials_add_up_to_row_and_column_sums(shape):
    v = torch.rand(shape)
    flat = v.reshape(-1)
    cuts = [0, 3, 11, 12, flat.numel()]
    r = torch.zeros(shape[0])
    c = torch.zeros(v[0].numel())
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        frag = torch.cat([flat[a:b], torch.zeros(2)]) if b == flat.numel() else flat[a:b]  # last one padded
        pr, pc = flat_fragment_rank1_partials(frag, a, shape)
        r += pr
        c += pc
    er, ec = rank1_factors(v)
    torch.testing.assert_close(r, er)
    torch.testing.assert_close(c, ec)


# ----------------------------------------------------------------------------------------
# naming
# ----------------------------------------------------------------------------------------


def test_clean_parameter_name():
    assert clean_parameter_name("module._orig_mod.model.norm.weight") == "model.norm.weight"
    assert clean_parameter_name(
        "_fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight"
    ) == ("model.layers.0.mlp.up_proj.weight")
    assert clean_parameter_name("model.module.weight") == "model.module.weight"  # only a leading module. is DDP's
    assert clean_parameter_name("base_model.model.q_proj.lora_A.default.weight", adapter_name="default") == (
        "base_model.model.q_proj.lora_A.weight"
    )


@pytest.mark.parametrize("tie", [True, False])
def test_names_match_saved_weights(tmp_path, tie):
    model = tiny_model(tie=tie)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    params, frozen = named_trainable_parameters(model)
    names = [p.name for p in params]
    assert len(names) == len(set(names))
    model.save_pretrained(tmp_path)
    saved = saved_weight_names(tmp_path)
    assert set(names) | set(frozen) == saved  # every saved weight is either trainable (has a name here) or frozen
    assert frozen == ["model.layers.0.mlp.up_proj.weight"]
    if tie:
        emb = next(p for p in params if p.name == "model.embed_tokens.weight")
        assert emb.aliases == ("lm_head.weight",) and "lm_head.weight" not in saved


def test_names_through_wrappers():
    model = tiny_model()
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DDP / DeepSpeed engines look like
    compiled = torch.nn.Module()
    compiled._orig_mod = wrapped
    a, _ = named_trainable_parameters(model)
    b, _ = named_trainable_parameters(compiled)
    assert [p.name for p in a] == [p.name for p in b]


# ----------------------------------------------------------------------------------------
# optimizer inspection
# ----------------------------------------------------------------------------------------


def test_inspect_refuses_optimizers_without_second_moment():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for opt in (torch.optim.SGD(p, lr=0.1), torch.optim.Adagrad(p), torch.optim.Adamax(p), torch.optim.RMSprop(p)):
        with pytest.raises(CaptureError, match="no Adam second moment") as e:
            inspect_optimizer(opt)
        assert isinstance(e.value, OTAError) and isinstance(e.value, RuntimeError)
    assert inspect_optimizer(torch.optim.AdamW(p)).family == "adam"
    assert inspect_optimizer(torch.optim.AdamW(p, fused=True)).family == "adam"
    assert inspect_optimizer(torch.optim.NAdam(p)).family == "adam"


def test_callback_rejects_unknown_compression():
    with pytest.raises(ConfigError, match="rank1"):
        OTACallback(compression="int8")


# ----------------------------------------------------------------------------------------
# Trainer runs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tie,compression,optim",
    [(True, "full", "adamw_torch_fused"), (False, "rank1", "adamw_torch"), (True, "rank1", "adamw_torch_fused")],
)
def test_trainer_moments_equal_optimizer_state(tmp_path, tie, compression, optim):
    out = tmp_path / "out"
    trainer = make_trainer(out, callback=OTACallback(compression), tie=tie, optim=optim)
    trainer.train()
    trainer.save_model()
    model = trainer.model
    shapes = shapes_of(model)
    final = expected_state(real_optimizer(trainer), model)

    # output_dir: final state, names line up with the saved weights
    assert_moments_match(out, final, compression=compression, shapes=shapes)
    meta = load_moments(out).metadata
    assert meta["optimizer"] == optim and meta["optimizer_family"] == "adam"
    assert meta["beta2"] == pytest.approx(0.999) and meta["step"] == 4 and meta["bias_corrected"] is False
    assert meta["compression"] == compression and meta["frozen_parameters"] == []
    assert meta["capture_engine"] == "local"
    saved = saved_weight_names(out)
    assert set(load_moments(out).shapes) == saved  # all trainable: every saved weight has moments, nothing more
    assert check_moments_cover_weights(out) == []
    if tie:
        assert meta["tied_parameters"] == {"lm_head.weight": "model.embed_tokens.weight"}

    # every checkpoint is merge-ready with the state of its own step
    snaps = trainer.ota_snapshot.at_save
    assert sorted(snaps) == [2, 4]
    for step, state in snaps.items():
        ckpt = out / f"checkpoint-{step}"
        assert_moments_match(ckpt, state, compression=compression, shapes=shapes)
        assert load_moments(ckpt).metadata["step"] == step
        assert check_moments_cover_weights(ckpt) == []
    assert MERGE_READY_TAG in trainer.model.model_tags


def test_sft_trainer_with_frozen_parameters(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ota_trainer.testing.tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tmp_path / "tok")
    model = tiny_model(tie=True)
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen, and tied to lm_head
    model.model.layers[1].self_attn.q_proj.weight.requires_grad_(False)
    data = Dataset.from_dict({"text": [f"{a} + {b} = {a + b}" for a in range(8) for b in range(4)]})
    args = SFTConfig(
        str(tmp_path / "out"),
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
        optim="adamw_torch",
    )
    before = args.to_dict()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[OTACallback("full")]
    )
    trainer.train()
    trainer.save_model()
    assert args.to_dict() == before  # the user's arguments are untouched
    out = tmp_path / "out"
    final = expected_state(real_optimizer(trainer), trainer.model)
    assert_moments_match(out, final, compression="full", shapes=shapes_of(trainer.model))
    meta = load_moments(out).metadata
    assert sorted(meta["frozen_parameters"]) == ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"]
    assert "model.embed_tokens.weight" not in load_moments(out)
    assert check_moments_cover_weights(out, meta["frozen_parameters"]) == []
    assert not list(out.glob("checkpoint-*"))


def test_adafactor(tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ota_trainer"):
        trainer = make_trainer(out, callback=OTACallback("full"), optim="adafactor", save_strategy="no")
        trainer.train()
    assert "Adafactor" in caplog.text
    final = expected_state(real_optimizer(trainer), trainer.model)
    assert any("exp_avg_sq_row" in s for s in final.values()) and any("exp_avg_sq" in s for s in final.values())
    assert_moments_match(out, final, compression="rank1", shapes=shapes_of(trainer.model))
    meta = load_moments(out).metadata
    assert meta["compression"] == "rank1" and meta["requested_compression"] == "full"
    assert meta["optimizer"] == "adafactor" and meta["beta2"] is None and meta["decay_rate"] == pytest.approx(-0.8)
    assert meta["step"] == 4


def test_bitsandbytes_8bit_adamw(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install bitsandbytes)")
    del bnb
    out = tmp_path / "out"
    try:
        trainer = make_trainer(out, callback=OTACallback("full"), optim="adamw_bnb_8bit", save_strategy="no")
        trainer.train()
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes 8-bit AdamW does not run on this CPU: {e}")
    opt = real_optimizer(trainer)
    assert "Optimizer2State" in [c.__name__ for c in type(opt).__mro__]
    final = expected_state(opt, trainer.model)
    kinds = {s["state2"].dtype for s in final.values()}
    assert kinds == {torch.uint8, torch.float32}  # 8-bit blocks for big tensors, fp32 below min_8bit_size
    assert_moments_match(out, final, compression="full", shapes=shapes_of(trainer.model))
    assert load_moments(out).metadata["optimizer_family"] == "bnb"


def test_sgd_is_refused_before_any_compute(tmp_path):
    out = tmp_path / "out"
    trainer = make_trainer(out, callback=OTACallback(), optim="sgd")
    with pytest.raises(CaptureError, match="SGD") as e:
        trainer.train()
    assert "adamw_torch" in str(e.value)
    assert trainer.state.global_step == 0
    assert not list(out.glob("checkpoint-*"))


def test_failed_capture_at_end_still_saves_the_model(tmp_path):
    class Poison(TrainerCallback):  # runs before OTACallback: corrupts one second moment
        def on_train_end(self, args, state, control, model=None, optimizer=None, **kw):
            optimizer.optimizer.state[model.model.norm.weight]["exp_avg_sq"][0] = float("nan")

    from transformers import Trainer

    out = tmp_path / "out"
    trainer = Trainer(
        model=tiny_model(),
        args=train_args(out, save_strategy="no"),
        train_dataset=tiny_dataset(),
        callbacks=[Poison(), OTACallback()],
    )
    with pytest.raises(CaptureError, match="saved to") as e:
        trainer.train()
    assert "NaN" in str(e.value) and "model.norm.weight" in str(e.value)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not moments_path(out).exists()


def test_resume_from_checkpoint(tmp_path):
    out = tmp_path / "out"
    first = make_trainer(out, callback=OTACallback("full"), max_steps=4, save_steps=2)
    first.train()
    uninterrupted = expected_state(real_optimizer(first), first.model)
    shapes = shapes_of(first.model)
    moments_path(out).unlink()
    for p in (out / "checkpoint-4").iterdir():  # forget the end of the first run
        if p.is_file():
            p.unlink()
    import shutil

    shutil.rmtree(out / "checkpoint-4")

    resumed = make_trainer(out, callback=OTACallback("full"), max_steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    final = expected_state(real_optimizer(resumed), resumed.model)
    assert_moments_match(out, final, compression="full", shapes=shapes)
    assert_moments_match(out / "checkpoint-4", resumed.ota_snapshot.at_save[4], compression="full", shapes=shapes)
    assert load_moments(out).metadata["step"] == 4
    # resuming reproduces the uninterrupted run's moments (same data order and RNG)
    for name, st in final.items():
        torch.testing.assert_close(st["exp_avg_sq"], uninterrupted[name]["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_save_strategy_best_and_load_best_model_at_end(tmp_path):
    # "best": the Trainer decides to save only after evaluating, so moments are captured in on_save;
    # at the end the best checkpoint (not the last step) is loaded, so its moments go to output_dir.
    out = tmp_path / "out"
    trainer = make_trainer(
        out,
        callback=OTACallback("rank1"),
        max_steps=4,
        save_strategy="best",
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # best = worst loss = step 2
        per_device_eval_batch_size=8,
        eval_dataset=tiny_dataset(8, seed=1),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2") and not (out / "checkpoint-4").exists()
    shapes = shapes_of(trainer.model)
    assert_moments_match(best, trainer.ota_snapshot.at_save[2], compression="rank1", shapes=shapes)
    assert moments_path(out).read_bytes() == moments_path(best).read_bytes()


def test_save_strategy_epoch(tmp_path):
    out = tmp_path / "out"
    trainer = make_trainer(
        out,
        callback=OTACallback("full"),
        max_steps=-1,
        num_train_epochs=1,
        save_strategy="epoch",
        train_dataset=tiny_dataset(8),
    )
    trainer.train()
    assert sorted(trainer.ota_snapshot.at_save) == [2]  # 8 samples / batch 4
    shapes = shapes_of(trainer.model)
    assert_moments_match(out / "checkpoint-2", trainer.ota_snapshot.at_save[2], compression="full", shapes=shapes)


def test_stale_moments_are_removed_at_train_begin(tmp_path):
    out = tmp_path / "out"
    old = tiny_model()
    save_optimizer_moments(out, old, _stepped_adamw(old))  # a leftover from "an earlier run"
    assert moments_path(out).is_file()
    trainer = make_trainer(out, callback=OTACallback(save_on_checkpoint=False), save_strategy="no", max_steps=2)

    seen = {}

    class Look(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.setdefault("exists", moments_path(out).exists())

    trainer.add_callback(Look())
    trainer.train()
    assert seen["exists"] is False
    assert load_moments(out).metadata["step"] == 2


def _stepped_adamw(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    opt.step()
    return opt


def test_save_optimizer_moments_without_trainer(tmp_path):
    model = tiny_model(tie=False)
    opt = _stepped_adamw(model)
    path = save_optimizer_moments(tmp_path, model, opt, compression="rank1", metadata={"base_model": "org/base"})
    assert path == moments_path(tmp_path)
    meta = load_moments(tmp_path).metadata
    assert meta["base_model"] == "org/base" and meta["step"] == 1 and meta["optimizer"] == "AdamW"
    assert save_optimizer_moments(tmp_path / "x", model, opt, write=False) is None
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------
# Hub: every commit that holds weights holds the moments of the same step (loopback Hub)
# ----------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.local_hub(lfs=True)
def test_push_to_hub_commits_moments_with_the_weights_of_the_same_step(tmp_path, local_hub):
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    out = tmp_path / "out"
    repo = "local-user/expert"
    trainer = make_trainer(
        out,
        callback=OTACallback("rank1"),
        max_steps=4,
        save_steps=2,
        push_to_hub=True,
        hub_model_id=repo,
        hub_strategy="checkpoint",
        hub_always_push=True,
    )

    class WaitForPush(TrainerCallback):
        """Trainer uploads output_dir in the background while training goes on and the next save
        overwrites output_dir (weights and moments alike): a Trainer race that would make this test
        flaky. Waiting for each upload keeps every commit's content deterministic."""

        def on_step_begin(self, args, state, control, **kwargs):
            if getattr(trainer, "push_in_progress", None) is not None:
                trainer.push_in_progress.wait_until_done()

    trainer.add_callback(WaitForPush())
    trainer.train()
    trainer.push_to_hub()  # the user's final push: weights saved into output_dir, card written, one commit

    api = HfApi()
    titles = {}
    for c in api.list_repo_commits(repo):
        titles.setdefault(c.title, c.commit_id)
    # mid-training commits of output_dir (the checkpoint's weights copied in) and of last-checkpoint/
    expected = {"Training in progress, step 2": 2, "End of training": 4}
    expected.update({"Training in progress, step 2, checkpoint": 2, "Training in progress, step 4, checkpoint": 4})
    assert set(expected) <= set(titles), sorted(titles)
    # The last in-training push of output_dir may be cancelled by push_to_hub(), or skipped by the
    # client as identical to "End of training": check it only when it happened.
    if "Training in progress, step 4" in titles:
        expected["Training in progress, step 4"] = 4
    for title, step in expected.items():
        rev = titles[title]
        prefix = "last-checkpoint/" if title.endswith("checkpoint") else ""
        files = set(api.list_repo_files(repo, revision=rev))
        assert {f"{prefix}model.safetensors", f"{prefix}ota/moments.safetensors"} <= files, (title, files)
        dl = tmp_path / "dl" / rev
        weights = hf_hub_download(repo, f"{prefix}model.safetensors", revision=rev, local_dir=dl)
        hf_hub_download(repo, f"{prefix}ota/moments.safetensors", revision=rev, local_dir=dl)
        meta = load_moments(Path(weights).parent).metadata
        assert meta["step"] == step, title
        if title != "End of training":  # the weights of that commit are checkpoint-N's
            assert _sha(weights) == _sha(out / f"checkpoint-{step}" / "model.safetensors"), title
            assert _sha(moments_path(Path(weights).parent)) == _sha(moments_path(out / f"checkpoint-{step}")), title
        assert check_moments_cover_weights(Path(weights).parent) == []
    # the final card is tagged merge-ready
    card = ModelCard.load(
        hf_hub_download(repo, "README.md", revision=titles["End of training"], local_dir=tmp_path / "card")
    )
    assert {MERGE_READY_TAG, "ota-moments-v1"} <= set(card.data.tags or [])


# ----------------------------------------------------------------------------------------
# tied weights saved under both names (DeepSpeed ZeRO-1/2 saves clones)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["full", "rank1"])
def test_align_moments_to_weights_saved_under_both_tied_names(tmp_path, compression):
    from ota_trainer.capture import align_moments_to_weights

    model = tiny_model(tie=True)
    opt = _stepped_adamw(model)
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    # weights saved from a state dict of clones: both tied names are written
    model.save_pretrained(tmp_path, state_dict={k: v.clone() for k, v in model.state_dict().items()})
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= saved_weight_names(tmp_path)
    save_optimizer_moments(tmp_path, model, opt, compression=compression, tied_aliases=False)
    assert check_moments_cover_weights(tmp_path) == ["no moments for saved trainable weight 'lm_head.weight'"]
    assert align_moments_to_weights(tmp_path, tied) is True
    assert check_moments_cover_weights(tmp_path) == []
    m = load_moments(tmp_path)
    torch.testing.assert_close(m["lm_head.weight"], m["model.embed_tokens.weight"])
    want = opt.state[model.model.embed_tokens.weight]["exp_avg_sq"]
    torch.testing.assert_close(m["lm_head.weight"], want if compression == "full" else m["model.embed_tokens.weight"])
    assert align_moments_to_weights(tmp_path, tied) is True  # already aligned: nothing rewritten

    # the other way round: moments under both names, weights deduplicated
    other = tmp_path / "dedup"
    model.save_pretrained(other)
    save_optimizer_moments(other, model, opt, compression=compression, tied_aliases=True)
    assert "lm_head.weight" in load_moments(other)
    assert align_moments_to_weights(other, tied) is False
    assert "lm_head.weight" not in load_moments(other) and check_moments_cover_weights(other) == []


@pytest.mark.parametrize("compression", ["full", "rank1"])
def test_bias_correction_apply_stores_corrected_moments(tmp_path, compression):
    out = tmp_path / "out"
    trainer = make_trainer(out, callback=OTACallback(compression, bias_correction="apply"))
    trainer.train()
    model = trainer.model
    final = expected_state(real_optimizer(trainer), model)
    reader = load_moments(out, bias_correction=True)  # the merger's default: must not correct twice
    meta = reader.metadata
    assert meta["bias_corrected"] is True and meta["step"] == 4
    scale = 1.0 / (1.0 - 0.999**4)
    shapes = shapes_of(model)
    for name, st in final.items():
        want = st["exp_avg_sq"].float() * scale
        if compression == "rank1" and len(shapes[name]) >= 2:  # row/column sums of the corrected v
            mat = want.reshape(shapes[name][0], -1)
            raw = raw_file(out)
            torch.testing.assert_close(raw[name + "::row"], mat.sum(1), rtol=1e-6, atol=0)
            torch.testing.assert_close(raw[name + "::col"], mat.sum(0), rtol=1e-6, atol=0)
        else:
            torch.testing.assert_close(reader[name], want, rtol=1e-6, atol=0)
    # the optimizer's own state was not scaled in place
    assert torch.equal(expected_state(real_optimizer(trainer), model)[name]["exp_avg_sq"], final[name]["exp_avg_sq"])


def test_bias_correction_option_is_checked_before_training(tmp_path):
    with pytest.raises(ConfigError, match="bias_correction"):
        OTACallback(bias_correction="sometimes")
    trainer = make_trainer(tmp_path / "out", callback=OTACallback(bias_correction="apply"), optim="adafactor")
    with pytest.raises(ConfigError, match="Adafactor"):
        trainer.train()
    assert trainer.state.global_step == 0
