"""Every training recipe under sft_configs/ loads and runs 2 SFT steps end to end.

Each YAML is read with ``scripts/train_sft.py``'s ``load_config``, its sections are checked,
then ``train`` runs with the recipe's own ``sft``/``ota`` settings except for: a tiny local
random Llama (and a tiny tokenizer built here) instead of the model, the demo's ``facts``
data instead of the dataset, and CPU-safe overrides. The run must leave
``<output_dir>/ota/moments.safetensors``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "sft_configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
REQUIRED = ("model", "dataset", "sft", "ota")

CPU_OVERRIDES = {
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "deepspeed": None,
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "report_to": [],
    "save_strategy": "no",
    "push_to_hub": False,
    # tiny model: 128 positions; no worker processes for 16 rows
    "max_length": 64,
    "dataset_num_proc": None,
    "dataloader_num_workers": 0,
}

# Generation tags so that recipes with assistant_only_loss: true also run.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ '<|assistant|> ' + m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def _load_train_sft():
    from ota_trainer.cli import train_sft

    return train_sft


@pytest.fixture(scope="module")
def train_sft():
    return _load_train_sft()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (vocab 128) with a tiny BPE tokenizer (printable ASCII + a few merges) beside it."""
    import string

    from ota_demo.tasks import build_dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ota_trainer.testing.tiny import make_tiny_base

    path = make_tiny_base(tmp_path_factory.mktemp("sft_cfg") / "tiny", seed=0)
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    texts = [m["content"] for row in build_dataset("facts", n=64, seed=0) for m in row["messages"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = [c for c in string.printable if not c.isspace()]  # no <unk> for the demo data
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() <= 128
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def _launch_gpus(path: Path) -> int | None:
    m = re.search(r"--num_processes\s+(\d+)", path.read_text().split("\nmodel:")[0])
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIGS])
def test_config_trains_two_steps(path, train_sft, tiny_model_dir, tmp_path):
    assert CONFIGS, "no recipes under sft_configs/"
    cfg = train_sft.load_config(path, [])
    for section in REQUIRED:
        assert cfg.get(section), f"{path.name}: section {section!r} missing or empty"
    sft = cfg["sft"]
    assert sft.get("output_dir"), f"{path.name}: sft.output_dir missing"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name}: should open with a comment (launch command)"
    rel = str(path.relative_to(ROOT))
    assert rel in path.read_text().split("\nmodel:")[0], f"{path.name}: launch comment should name {rel}"

    if path.parent.name == "paper":  # paper-scale recipes: effective batch 128, ZeRO-3 file present
        gpus = _launch_gpus(path)
        assert gpus, f"{path.name}: launch comment needs --num_processes N"
        assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] * gpus == 128
        ds = json.loads((ROOT / sft["deepspeed"]).read_text())
        assert ds["zero_optimization"]["stage"] == 3

    # The run: the recipe's own settings, with a tiny model, tiny data and CPU-safe overrides.
    cfg["model"] = str(tiny_model_dir)
    cfg["tokenizer"] = {**(cfg.get("tokenizer") or {}), "path": str(tiny_model_dir)}
    cfg["dataset"] = {"builtin": "facts", "n": 16}
    out = tmp_path / "out"
    cfg["sft"] = {**sft, **CPU_OVERRIDES, "output_dir": str(out)}
    trainer = train_sft.train(cfg)

    assert trainer.state.global_step == 2
    assert (out / "ota" / "moments.safetensors").is_file()
    assert (out / "ota_train_config.yaml").is_file()
    if cfg.get("lora"):  # a LoRA recipe: an adapter, with the adapted weights' curvature
        from ota_trainer.moments.format import load_moments

        assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
        meta = load_moments(out).metadata
        assert meta["capture"] == "lora" and meta["lora"]["r"] == cfg["lora"]["r"]
        assert not (out / "ota" / "ffg_histogram.safetensors").exists()  # (adapters are materialised per merge)
    else:  # the expert ships its FFG histogram (OTACallback, at the end of training)
        from ota_trainer.merger.ffg_shipped import open_shipped
        from ota_trainer.merger.inputs import open_model

        shipped = open_shipped(open_model(out))
        assert shipped is not None and shipped.histogram.total == sum(
            p.numel() for p in trainer.model.parameters() if p.requires_grad
        )


def test_a_bad_lora_section_is_a_config_error(train_sft, tiny_model_dir, tmp_path):
    from ota_trainer.errors import ConfigError

    cfg = {
        "model": str(tiny_model_dir),
        "dataset": {"builtin": "facts", "n": 16},
        "sft": {**CPU_OVERRIDES, "output_dir": str(tmp_path / "o"), "max_steps": 1},
        "lora": {"r": 4, "no_such_field": 1},
    }
    with pytest.raises(ConfigError, match="'lora' section"):
        train_sft.train(cfg)


def test_console_scripts_are_installed_and_share_the_conventions(tmp_path):
    """pip users get ota-merge, ota-inspect and ota-train-sft, with --version; outside a checkout a
    builtin (demo) dataset is refused with what to do instead."""
    import shutil
    import subprocess
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("ota-")}
    assert scripts == {
        "ota-merge": "ota_trainer.cli.merge:main",
        "ota-inspect": "ota_trainer.cli.inspect:main",
        "ota-train-sft": "ota_trainer.cli.train_sft:main",
    }
    exe = shutil.which("ota-train-sft", path=str(Path(sys.executable).parent))
    assert exe is not None
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ota-train-sft (ota_trainer " in r.stdout
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: some/model\ndataset: {builtin: arithmetic}\nsft: {output_dir: out, max_steps: 1}\n")
    r = subprocess.run([exe, "--config", str(cfg)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "dataset.builtin='arithmetic'" in r.stderr and "dataset.path" in r.stderr


def _tiny_cfg(tiny_model_dir, out: Path, **sft) -> dict:
    return {
        "model": str(tiny_model_dir),
        "dataset": {"builtin": "facts", "n": 16},
        "sft": {**CPU_OVERRIDES, "output_dir": str(out), **sft},
        "ota": {"compression": "rank1"},
    }


def test_lm_head_logits_trains_with_the_same_loss(train_sft, tiny_model_dir, tmp_path):
    """``trainer.lm_head: logits`` (the model's own cross-entropy over full logits) gives TRL's
    fused-head loss at every step, the same second moments, and no entropy/accuracy metrics."""
    from ota_trainer.moments.format import load_moments

    runs = {}
    for lm_head in ("fused", "logits"):
        cfg = _tiny_cfg(tiny_model_dir, tmp_path / lm_head, max_steps=4, logging_steps=1, seed=0)
        cfg["trainer"] = {"lm_head": lm_head}
        trainer = train_sft.train(cfg)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 4
        runs[lm_head] = (logs, load_moments(tmp_path / lm_head))
    (fused, m_fused), (logits, m_logits) = runs["fused"], runs["logits"]
    for a, b in zip(fused, logits):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-4)
        assert float(b["grad_norm"]) == pytest.approx(float(a["grad_norm"]), rel=1e-3)
    assert all("entropy" in h and "mean_token_accuracy" in h for h in fused)
    assert not any("entropy" in h or "mean_token_accuracy" in h for h in logits)
    assert sorted(m_fused) == sorted(m_logits) and len(m_fused) > 0
    for name in m_fused:  # (Adam's second moments after 4 steps: relative agreement, gradients ~1e-3 apart)
        assert m_logits[name].allclose(m_fused[name], rtol=1e-2, atol=1e-12), name


@pytest.mark.parametrize(
    "section, sft, match",
    [
        ({"lm_head": "nope"}, {}, "lm_head 'nope'"),
        ({"lmhead": "logits"}, {}, "'trainer' section"),
        ("logits", {}, "'trainer' section"),
        ({"lm_head": "logits"}, {"loss_type": "dft"}, "loss_type 'dft'"),
        ({"memory": "cached"}, {}, "memory 'cached'"),
    ],
)
def test_a_bad_trainer_section_is_a_config_error(train_sft, tiny_model_dir, tmp_path, section, sft, match):
    from ota_trainer.errors import ConfigError

    cfg = _tiny_cfg(tiny_model_dir, tmp_path / "o", max_steps=1, **sft)
    cfg["trainer"] = section
    with pytest.raises(ConfigError, match=match):
        train_sft.train(cfg)
    assert not (tmp_path / "o").exists()  # refused before the model loaded or anything was written


def test_retain_freed_memory_reuses_pages_instead_of_faulting_new_ones():
    """glibc gives PyTorch's freed blocks back (a 64 MB tensor: ~16k fresh pages each time);
    ``retain_freed_memory`` keeps them for the next allocations (after a few rounds, once the heap
    holds the blocks in use: counted over the last 10 of 30). In a new process (the setting lasts
    for the process)."""
    import subprocess

    code = """if True:
        import resource, sys, torch
        from ota_trainer.cli.train_sft import retain_freed_memory
        if sys.argv[1] == "retain":
            assert retain_freed_memory()
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            x = torch.empty(16 * 2**20); x.fill_(1); del x
        f0 = faults()
        for _ in range(10):
            x = torch.empty(16 * 2**20); x.fill_(1); del x
        print(faults() - f0)
    """
    got = {}
    for mode in ("system", "retain"):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        got[mode] = int(r.stdout.split()[-1])
    assert got["system"] > 10 * 8000  # each 64 MB block faulted in afresh
    assert got["retain"] < got["system"] / 10, got


def test_trainer_memory_retain_trains_the_same_bits(tiny_model_dir, tmp_path):
    """``trainer.memory`` changes where freed blocks go, not one bit of the trained model or its
    moments; ``auto`` (the default) retains on the CPU and says so."""
    import hashlib
    import subprocess

    import yaml
    from safetensors import safe_open

    digests, logs = {}, {}
    for memory in ("system", "auto"):
        out = tmp_path / memory
        cfg = _tiny_cfg(tiny_model_dir, out, max_steps=3, seed=0)
        cfg["trainer"] = {"memory": memory}
        path = tmp_path / f"{memory}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train_sft.py"), "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        logs[memory] = r.stderr
        with safe_open(out / "ota" / "moments.safetensors", "np") as f:  # (its metadata names the folder)
            moments = [hashlib.sha256(f.get_tensor(k).tobytes()).hexdigest() for k in sorted(f.keys())]
        digests[memory] = [hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(), *moments]
    assert digests["auto"] == digests["system"]
    assert "trainer.memory: retain" in logs["auto"] and "trainer.memory" not in logs["system"]
