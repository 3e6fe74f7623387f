"""Train a capability expert with TRL's SFTTrainer and OTACallback (merge-ready checkpoints).

    ota-train-sft --config sft_configs/smollm2_cpu_arithmetic.yaml
    ota-train-sft --config sft_configs/smollm2_cpu_facts.yaml \\
        --model path/to/base --sft.max_steps 20 --sft.output_dir out/facts --ota.compression full

A config is a YAML file with these sections:

``model``    model id or local folder (the base the expert is fine-tuned from)
``dataset``  ``{builtin: arithmetic|facts|shout, n, seed}`` (the demo's local generators), or
             ``{path: <datasets name or local dir>, name?, split?, data_files?, columns?}``, or
             ``{mixture: [{path, name?, split?, data_files?, fraction?}]}``; rows need a
             ``messages`` column (chat) or ``prompt``/``completion`` or ``text``
``sft``      ``trl.SFTConfig`` fields (output_dir, max_steps, learning_rate, ...)
``ota``      ``OTACallback`` options (compression, save_on_checkpoint, ...)
``tokenizer`` optional ``{path, chat_template}``
``lora``     optional ``peft.LoraConfig`` fields (r, lora_alpha, target_modules, ...): train a LoRA
             adapter instead of the full model; OTACallback then stores the adapted weights'
             curvature (``ota: {lora_estimator: exact|factored, lora_every, lora_window}``)
``trainer``  optional ``{lm_head: fused|logits, memory: auto|retain|system}``: how the loss is
             computed (:data:`LM_HEADS`) and what happens to freed memory (:data:`MEMORY_MODES`)

Overrides: ``--section.key value`` (YAML-parsed), or ``--model X``. The resolved config is
written to ``<output_dir>/ota_train_config.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
SECTIONS = ("model", "dataset", "sft", "ota", "tokenizer", "lora", "trainer")

# ``trainer.lm_head``: how the training loss is computed.
# - ``fused`` (the default): TRL's fused LM head, which projects the hidden states through the LM
#   head in vocabulary chunks and returns per-token log-probabilities, entropy and top-1 hits
#   without the full logits (the ``entropy`` and ``mean_token_accuracy`` metrics come from it).
# - ``logits``: the model's own forward with its labels (full logits, cross-entropy), as
#   ``transformers.Trainer`` computes it: the same loss (~1e-5 relative over 12 steps of
#   SmolLM2-135M), without those two metrics. On the CPU TRL's chunks fall back from Triton to a
#   dozen eager PyTorch passes over each chunk of logits, forward and backward (~50% of a step's
#   CPU time in torch.profiler); measured steps 1.1-1.6x faster (scripts/bench_train.py, README).
LM_HEADS = ("fused", "logits")

# ``trainer.memory``: what the C allocator does with memory PyTorch frees, on the CPU.
# - ``retain``: keep it in the process for the next step (:func:`retain_freed_memory`). PyTorch has
#   no caching allocator on the CPU: every activation, gradient and logits block of a step is
#   malloc'd and freed, glibc serves blocks above its mmap threshold (at most 32 MB) with fresh
#   mappings, and each step faulted in ~2.8 GB of new zeroed pages (SmolLM2-135M, batch 8 x 96,
#   TRL's fused head: 692k minor faults and 1.75 s of system time per 3.35 s step; retained: 86k,
#   0.58 s, 2.55 s steps; scripts/bench_train.py). The arithmetic is untouched: the same bits.
# - ``system``: glibc's defaults.
# - ``auto`` (the default): ``retain`` when the run trains on the CPU, else ``system``.
MEMORY_MODES = ("auto", "retain", "system")
TRAINER_KEYS = {"lm_head": LM_HEADS, "memory": MEMORY_MODES}


def load_config(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Read a config and apply ``--section.key value`` overrides.

    Raises:
        ota_trainer.ConfigError: unknown section or malformed override.
    """
    import yaml

    from ..errors import ConfigError

    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read training config {path}: {e}") from e
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    it = iter(overrides)
    for flag in it:
        if not flag.startswith("--"):
            raise ConfigError(f"override {flag!r}: expected --section.key value")
        try:
            value = yaml.safe_load(next(it))
        except StopIteration:
            raise ConfigError(f"override {flag} has no value") from None
        keys = flag[2:].split(".")
        if keys[0] not in SECTIONS:
            raise ConfigError(f"override {flag}: unknown section {keys[0]!r}; known: {list(SECTIONS)}")
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    if not cfg.get("model"):
        raise ConfigError(f"{path}: 'model' is required")
    return cfg


def load_training_data(spec: dict[str, Any]):
    """The training ``datasets.Dataset`` a config's ``dataset`` section describes."""
    from datasets import concatenate_datasets, load_dataset

    from ..errors import ConfigError

    if "builtin" in spec:
        try:  # the demo's generators live in a checkout's scripts/ (on the path when run as scripts/train_sft.py)
            from ota_demo.tasks import TASKS, build_dataset
        except ModuleNotFoundError:
            raise ConfigError(
                f"dataset.builtin={spec['builtin']!r} uses the demo's generators (scripts/ota_demo in a checkout of "
                "ota_trainer): run `python scripts/train_sft.py` there, or give dataset.path (a datasets name or a "
                "local folder of JSONL/Parquet files)"
            ) from None

        if spec["builtin"] not in TASKS:
            raise ConfigError(f"unknown builtin dataset {spec['builtin']!r}; known: {sorted(TASKS)}")
        return build_dataset(spec["builtin"], split="train", n=int(spec.get("n", 2000)), seed=int(spec.get("seed", 0)))
    parts = spec.get("mixture") or [spec]
    sets = []
    for part in parts:
        if "path" not in part:
            raise ConfigError(f"dataset entry {part!r} needs 'builtin', 'path' or 'mixture'")
        ds = load_dataset(
            part["path"], part.get("name"), split=part.get("split", "train"), data_files=part.get("data_files")
        )
        if part.get("filter_source"):
            ds = ds.filter(lambda r, s=part["filter_source"]: r.get("source") in s)
        if part.get("fraction") is not None:
            ds = ds.shuffle(seed=int(spec.get("seed", 0))).select(range(int(len(ds) * float(part["fraction"]))))
        if part.get("columns"):
            ds = ds.select_columns(part["columns"])
        sets.append(ds)
    return sets[0] if len(sets) == 1 else concatenate_datasets(sets).shuffle(seed=int(spec.get("seed", 0)))


def train(cfg: dict[str, Any], *, extra_callbacks: tuple = ()):
    """Run SFTTrainer with OTACallback (and ``extra_callbacks``, e.g. a benchmark's step timer) as
    the config says; returns the trainer."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ..capture import OTACallback
    from ..errors import ConfigError

    data = load_training_data(cfg.get("dataset") or {})  # a bad dataset section fails before any model loads
    sft = dict(cfg.get("sft") or {})
    args = SFTConfig(**sft)
    tok_cfg = cfg.get("tokenizer") or {}
    tokenizer = AutoTokenizer.from_pretrained(tok_cfg.get("path", cfg["model"]))
    if tok_cfg.get("chat_template"):  # e.g. the paper's tulu_v3 template with generation tags
        tokenizer.chat_template = tok_cfg["chat_template"]
    peft_config = None
    if cfg.get("lora"):
        try:
            from peft import LoraConfig
        except ModuleNotFoundError:
            raise ConfigError("the config's 'lora' section needs PEFT: pip install 'ota_trainer[lora]'") from None
        lora = dict(cfg["lora"])
        lora.setdefault("task_type", "CAUSAL_LM")
        try:
            peft_config = LoraConfig(**lora)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"the config's 'lora' section: {e}") from None
    callback = OTACallback(**(cfg.get("ota") or {}))  # bad options fail before the model loads
    options = _trainer_options(cfg.get("trainer") or {}, args)
    trainer_cls = _trainer_class(options["lm_head"], SFTTrainer)
    memory = options["memory"]
    if memory == "auto":
        memory = "retain" if args.device.type == "cpu" else "system"
    if memory == "retain":
        if retain_freed_memory():
            logger.info("trainer.memory: retain: memory PyTorch frees stays in the process for the next step")
        else:
            logger.info("trainer.memory: retain: not available here (glibc's mallopt only); the allocator's defaults")
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback, *extra_callbacks],
    )
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "ota_train_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    trainer.train(resume_from_checkpoint=sft.get("resume_from_checkpoint"))
    trainer.save_model(args.output_dir)  # beside the moments and FFG histogram OTACallback wrote
    if args.push_to_hub:
        trainer.push_to_hub()
    return trainer


def _trainer_options(spec: Any, args) -> dict[str, str]:
    """The config's ``trainer`` section, checked, with its defaults (:data:`TRAINER_KEYS`).

    Raises:
        ota_trainer.ConfigError: not a mapping, an unknown key or value, or ``lm_head: logits``
            with a ``loss_type`` other than ``nll`` (the model's own loss is the plain cross-entropy).
    """
    from ..errors import ConfigError

    known = ", ".join(f"{k}: {'|'.join(v)}" for k, v in TRAINER_KEYS.items())
    if not isinstance(spec, dict) or set(spec) - set(TRAINER_KEYS):
        raise ConfigError(f"the config's 'trainer' section: expected {{{known}}}, got {spec!r}")
    options = {key: spec.get(key, values[0]) for key, values in TRAINER_KEYS.items()}
    for key, value in options.items():
        if value not in TRAINER_KEYS[key]:
            raise ConfigError(f"the config's 'trainer' section: {key} {value!r}; known: {list(TRAINER_KEYS[key])}")
    if options["lm_head"] == "logits" and getattr(args, "loss_type", "nll") not in ("nll", "chunked_nll"):
        raise ConfigError(
            f"trainer.lm_head: logits computes the plain cross-entropy; sft.loss_type {args.loss_type!r} needs "
            "lm_head: fused"
        )
    return options


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory in the process: every block from the heap, none from its own
    mapping (``M_MMAP_MAX`` 0), and the heap's free top given back only beyond 2 GB
    (``M_TRIM_THRESHOLD``). For the rest of the process; True if glibc took both settings.

    A CPU training step then reuses the previous step's pages instead of faulting in fresh ones
    (see :data:`MEMORY_MODES`); the peak resident size can grow by what fragmentation holds back
    (+7%, 4.27 to 4.58 GB, on the SmolLM2-135M benchmark). Blocks too large for a thread's own
    heap come from the main heap. Call it in your own training script, before the model loads, to
    get the same; False (nothing changed) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


def _trainer_class(lm_head: str, sft_trainer: type) -> type:
    """SFTTrainer, or with ``lm_head: logits`` a subclass computing the model's own loss."""
    if lm_head == "fused":
        return sft_trainer
    from transformers import Trainer

    class LogitsLossSFTTrainer(sft_trainer):
        """SFTTrainer whose loss is the model's own (full logits): ``trainer.lm_head: logits``."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "use_cache": False}
            if getattr(self, "aux_loss_enabled", False):  # MoE: the model adds its router loss itself
                inputs["output_router_logits"] = True
            return Trainer.compute_loss(
                self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    return LogitsLossSFTTrainer


def main(argv: list[str] | None = None) -> int:
    from .common import add_common_flags, configure_logging

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training config YAML (see sft_configs/)")
    ap.add_argument("--model", help="override the config's model")
    add_common_flags(ap)
    args, rest = ap.parse_known_args(argv)
    configure_logging(args)
    from ..errors import OTAError

    try:
        cfg = load_config(args.config, rest)
        if args.model:
            cfg["model"] = args.model
        train(cfg)
    except OTAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
