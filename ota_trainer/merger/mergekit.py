"""mergekit recipes as people write them: its keys and spellings, with mergekit's meaning.

:func:`translate` rewrites a recipe mapping into ours before validation (one place, so the CLI,
the Python API and ``ota_merge.yaml`` agree); :func:`declined` names the mergekit keys we do not
take, with why and what to use instead. What maps how:

- ``merge_method`` -> ``method``; ``normalize``, ``lambda``, ``weight``, ``density`` are method
  parameters (see each method); DARE's ``density`` (kept fraction) -> ``drop_rate = 1 - density``
  (each method's ``translate`` hook).
- ``dtype`` / ``out_dtype`` with mergekit's aliases (``bf16``, ``fp16``, ``fp32``, ``auto``): the
  output dtype is ``out_dtype``, else ``dtype``; we always compute in float32.
- ``int8_mask``: accepted, no effect (a memory option of mergekit's masks; one info line).
- ``tokenizer_source: base`` (or ``tokenizer: {source: base}``): what we do anyway; other sources
  (``union``, ``model:...``) need vocabulary surgery we do not do, and are refused.
- ``chat_template``: ``auto`` (the template most of the experts share), ``chatml``, or the
  Jinja text itself.

Standard library only.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..errors import ConfigError, brief

logger = logging.getLogger(__name__)

__all__ = ["translate", "declined", "setting", "evaluate", "layer_t", "DTYPE_ALIASES", "DECLINED", "CHATML"]

# mergekit's dtype spellings -> ours ("auto": the base's dtype, as when dtype is not given)
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
# mergekit keys we decline, and why (a recipe that uses one is refused with this reason)
DECLINED = {
    "slices": "layer slicing (frankenmerges) is not supported: every expert is merged whole; use `models:`",
    "modules": "per-module definitions are not supported; use `models:` (one merge of whole models)",
    "rescale": "our DARE rescales kept edits by 1/density (the DARE paper); mergekit's L1-norm rescale is not "
    "implemented; remove `rescale`",
    "t": "SLERP is not a method here; use ota, linear or task_arithmetic",
}
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_TOKENIZER_KEYS = {"source"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


# -- per-tensor settings: mergekit's gradients and filters ---------------------------------------
def setting(value: Any, coerce, where: str) -> Any:
    """A per-tensor setting checked: a scalar (``coerce``d), a gradient (a list of numbers,
    interpolated over the layers) or a filter list (``[{filter: substring, value: scalar or
    gradient}, ..., {value: fallback}]``, the first match wins).

    Raises:
        ConfigError: naming ``where``.
    """
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return coerce(value)
    if not value:
        raise ConfigError(f"{where}: an empty list")
    if all(isinstance(v, dict) for v in value):
        out = []
        for cond in value:
            if "value" not in cond or set(cond) - {"value", "filter"} or not isinstance(cond.get("filter", ""), str):
                raise ConfigError(f"{where}: {brief(cond)}: a filter entry is {{filter: <substring>, value: <value>}}")
            inner = cond["value"]
            inner = [coerce(v) for v in inner] if isinstance(inner, list) and inner else coerce(inner)
            out.append({**({"filter": cond["filter"]} if cond.get("filter") is not None else {}), "value": inner})
        return out
    if any(isinstance(v, (dict, list, bool)) or not isinstance(v, (int, float)) for v in value):
        raise ConfigError(f"{where}: {brief(value)}: a gradient is a list of numbers")
    return [coerce(v) for v in value]


def layer_t(name: str, layers: int) -> float:
    """mergekit's ``t`` of a tensor: ``i / (layers - 1)`` in layer ``i`` (1 with one layer), 0 outside
    the layers (embeddings, final norm, head)."""
    m = _LAYER.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (layers - 1) if layers > 1 else 1.0


def count_layers(names: list[str]) -> int:
    """The number of layers a model's tensor names show (highest layer index + 1; 0 without layers)."""
    idx = [int(m.group(1)) for m in map(_LAYER.search, names) if m is not None]
    return max(idx) + 1 if idx else 0


def evaluate(value: Any, name: str, t: float, default: Any) -> Any:
    """A per-tensor setting's value for tensor ``name`` at ``t`` (see :func:`setting`); ``default``
    when no filter matches."""
    if not isinstance(value, list):
        return value
    if all(isinstance(v, dict) for v in value):
        for cond in value:
            f = cond.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate(cond["value"], name, t, default)
        return default
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def declined(keys: list[Any]) -> str | None:
    """The reason(s) for mergekit keys we decline (None when none of ``keys`` is one)."""
    reasons = [f"{k!r}: {DECLINED[k]}" for k in keys if isinstance(k, str) and k in DECLINED]
    return "; ".join(reasons) or None


def output_dtype(value: Any, key: str) -> str | None:
    """Our dtype name for mergekit's spelling (None for ``auto``: the base's)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {brief(value)} is not a dtype name")
    v = value.strip().lower()
    return None if v == "auto" else DTYPE_ALIASES.get(v, v)


def translate(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with mergekit's keys and spellings rewritten into ours (a new mapping).

    Raises:
        ConfigError: a tokenizer source other than the base, an unknown chat template name,
            a method parameter given in both spellings.
    """
    data = dict(data)
    out = data.pop("out_dtype", None)
    if out is not None:
        if data.get("dtype") is not None and output_dtype(data["dtype"], "dtype") != output_dtype(out, "out_dtype"):
            logger.info(
                "dtype %s is mergekit's computation dtype; ota_trainer always computes in float32 and writes "
                "out_dtype %s",
                data["dtype"],
                out,
            )
        data["dtype"] = output_dtype(out, "out_dtype")
    elif data.get("dtype") is not None:
        data["dtype"] = output_dtype(data["dtype"], "dtype")
    _tokenizer(data)
    _chat_template(data)
    params = data.get("parameters")
    if isinstance(params, dict) and "int8_mask" in params:
        params = {k: v for k, v in params.items() if k != "int8_mask"}
        data["parameters"] = params
        logger.info("int8_mask: accepted, no effect (mergekit's mask memory option; our masks are never stored)")
    method = data.get("method") or data.get("merge_method")
    from .methods import METHODS

    spec = METHODS.get(method) if isinstance(method, str) else None
    if spec is not None and spec.translate is not None:
        if isinstance(params, dict):
            data["parameters"] = spec.translate(dict(params), "parameters")
        models = data.get("models")
        if isinstance(models, list):
            data["models"] = [
                {**m, "parameters": spec.translate(dict(m["parameters"]), f"models[{i}]")}
                if isinstance(m, dict) and isinstance(m.get("parameters"), dict)
                else m
                for i, m in enumerate(models)
            ]
    return data


def _tokenizer(data: dict[str, Any]) -> None:
    source = data.pop("tokenizer_source", None)
    tok = data.pop("tokenizer", None)
    if tok is not None:
        if not isinstance(tok, dict) or set(tok) - _TOKENIZER_KEYS:
            raise ConfigError(
                f"tokenizer: {brief(tok)}: only `tokenizer: {{source: base}}` is supported (the merged model takes "
                "the base's tokenizer files unchanged); token embeddings surgery (`tokens`, `pad_to_multiple_of`) "
                "is not implemented"
            )
        source = tok.get("source", source)
    if source is None:
        return
    if source != "base":
        raise ConfigError(
            f"tokenizer_source: {brief(source)} is not supported: the merged model takes the base's tokenizer "
            "files unchanged (`tokenizer_source: base`); a union or another model's vocabulary needs embedding "
            "surgery this library does not do: merge experts that share the base's tokenizer"
        )
    if not data.get("base_model"):
        raise ConfigError("tokenizer_source: base needs a base_model")


def _chat_template(data: dict[str, Any]) -> None:
    t = data.get("chat_template")
    if t is None:
        return
    if not isinstance(t, str) or not t.strip():
        raise ConfigError(f"chat_template: {brief(t)}: give 'auto', 'chatml' or the Jinja template text")
    if len(t) > 65536:
        raise ConfigError(f"chat_template: {len(t)} characters; at most 65536")
    if t.strip() == "chatml":
        data["chat_template"] = CHATML
    elif t.strip() != "auto" and "{{" not in t and "{%" not in t:
        raise ConfigError(
            f"chat_template: {brief(t)} is not a template name we know: give 'auto' (the template most of the "
            "experts share), 'chatml', or the Jinja template text itself"
        )
