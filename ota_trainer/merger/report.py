"""What a merge leaves beside the weights: the report, the recipe, the model card and the
base's config/tokenizer files. No PyTorch: the runner finishes every output folder here."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..errors import FormatError
from ..io.write import output_errors
from .inputs import MergeInputs, ModelLayout
from .methods import get_method
from .recipe import MergeRecipe

__all__ = [
    "ExpertReport",
    "MergeReport",
    "RECIPE_FILE",
    "REPORT_FILE",
    "CARD_FILE",
    "copy_side_files",
    "finish",
    "local_resolver",
]

RECIPE_FILE = "ota_merge.yaml"
REPORT_FILE = "ota_merge_report.json"
CARD_FILE = "README.md"
# A resolver turns a model reference from the recipe (folder or repo id) into a local folder.
Resolver = Callable[[str], Path]


@dataclass
class ExpertReport:
    """What FFG did to one expert."""

    model: str
    density_target: float | None
    threshold_log2: float | None
    kept: int = 0
    total: int = 0
    saliency_share: float | None = None
    grafted: bool = False  # FFG ran on this expert (density is then the achieved kept fraction)
    no_moments: bool = False  # a grafting merge kept all of this expert's edits: it has no moments

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 1.0


@dataclass
class MergeReport:
    """Returned by :func:`merge` and written to ``ota_merge_report.json`` in the output."""

    method: str
    out_dir: str
    recipe: dict[str, Any]
    experts: list[ExpertReport]
    tensor_density: dict[str, list[float]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    sources: dict[str, str | None] = field(default_factory=dict)
    pinned_recipe: dict[str, Any] = field(default_factory=dict)  # ota_merge.yaml: shas and every value used
    seconds: float = 0.0
    library_version: str = __version__
    adapter: dict[str, Any] | None = None  # out_adapter_rank: the output adapter's rank and errors per module

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for e, rep in zip(d["experts"], self.experts):
            e["density"] = rep.density
            if e["threshold_log2"] is not None and not math.isfinite(e["threshold_log2"]):
                e["threshold_log2"] = None  # keep-everything threshold; JSON has no -Infinity
        return d


def local_resolver(ref: str) -> Path:
    p = Path(ref).expanduser()
    if not p.is_dir():
        raise FormatError(f"model {ref!r}: no such folder", path=str(p))
    return p


def chat_template_of(model: ModelLayout) -> str | None:
    """A model's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (its ``default`` entry when it names several); None when it has none."""
    try:
        if "chat_template.jinja" in model.side:
            return model.side["chat_template.jinja"].read_text(encoding="utf-8")[:65536] or None
        if "tokenizer_config.json" in model.side:
            t = json.loads(model.side["tokenizer_config.json"].read_text(encoding="utf-8")).get("chat_template")
            if isinstance(t, list):
                t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
            return t if isinstance(t, str) and t else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise FormatError(f"{model.label}: unreadable tokenizer files ({e})", path=str(model.path)) from None
    return None


def resolve_chat_template(choice: str | None, inputs: MergeInputs) -> str | None:
    """The recipe's ``chat_template`` as text: ``auto`` is the template most experts share (None:
    keep the template's own), anything else is the text itself."""
    if choice != "auto":
        return choice
    from collections import Counter

    counts = Counter(t for t in (chat_template_of(e) for e in inputs.experts) if t)
    return counts.most_common(1)[0][0] if counts else None


def copy_side_files(model: ModelLayout, tmp: Path, dtype: str | None, chat_template: str | None = None) -> list[str]:
    """config.json (with the output dtype) and the model's tokenizer/generation files (as
    validated and confined when it was opened) into ``tmp``; ``chat_template`` (text) replaces
    the tokenizer's chat template."""
    files = []
    config = dict(model.config)
    with output_errors(tmp):
        if model.has_config:
            if dtype:
                for key in ("torch_dtype", "dtype"):
                    if key in config:
                        config[key] = dtype
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            files.append("config.json")
        for name, real in model.side.items():
            shutil.copyfile(real, tmp / name)
            files.append(name)
        if chat_template is not None:
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
            files += [] if "chat_template.jinja" in files else ["chat_template.jinja"]
            tok = tmp / "tokenizer_config.json"
            if tok.is_file():
                cfg = json.loads(tok.read_text(encoding="utf-8"))
                if "chat_template" in cfg:  # one template, not two that disagree
                    cfg["chat_template"] = chat_template
                    tok.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return files


def finish(
    tmp: Path,
    recipe: MergeRecipe,
    dest: Path,
    experts: list[ExpertReport],
    tensor_density: dict[str, list[float]],
    files: list[str],
    resolver: Resolver,
    start: float,
    inputs: MergeInputs,
    adapter: dict[str, Any] | None = None,
) -> MergeReport:
    """Write the recipe, the model card and the report into ``tmp``; returns the report."""
    report = MergeReport(
        method=recipe.method,
        out_dir=str(dest),
        recipe=recipe.to_dict(),
        experts=experts,
        tensor_density=tensor_density,
        files=files + [RECIPE_FILE, REPORT_FILE, CARD_FILE],
        adapter=adapter,
    )
    sha = getattr(resolver, "sha", None)
    refs = recipe.refs
    report.sources = {r: (sha(r) if sha else None) for r in refs}
    report.pinned_recipe = recipe.pinned(report.sources)
    with output_errors(tmp):
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(report.pinned_recipe, sort_keys=False))
        card = render_model_card(report.to_dict(), report.sources, base_id=named_base(inputs))
        (tmp / CARD_FILE).write_text(card)
        report.seconds = time.perf_counter() - start
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report


def _is_repo_id(ref: str) -> bool:
    parts = ref.split("@")[0].split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~")) and not Path(ref).exists()


def named_base(inputs: MergeInputs) -> str | None:
    """The Hub id a local base names for itself: its config's ``_name_or_path`` when that is a
    repo id, else the ``base_model`` the experts' own cards agree on (None when nothing does)."""
    base = inputs.base
    if base is None:
        return None
    own = base.config.get("_name_or_path")
    if isinstance(own, str) and _is_repo_id(own):
        return own
    named = {card_base_model(e.path) for e in inputs.experts}
    return named.pop() if len(named) == 1 and None not in named else None


def card_base_model(folder: Path) -> str | None:
    """The single ``base_model`` repo id in a folder's README.md front matter (None otherwise)."""
    import yaml

    readme = Path(folder) / CARD_FILE
    try:
        text = readme.read_text(encoding="utf-8")[:65536] if readme.is_file() and not readme.is_symlink() else ""
        front = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") and text.count("---") >= 2 else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = front.get("base_model") if isinstance(front, dict) else None
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    return value if isinstance(value, str) and _is_repo_id(value) else None


def render_model_card(
    report: dict[str, Any], sources: dict[str, str | None], *, title: str | None = None, base_id: str | None = None
) -> str:
    """The merged model's README.md: Hub model-card YAML front matter and a Markdown body.

    Args:
        report: :meth:`MergeReport.to_dict` output (method, recipe, experts' achieved density).
        sources: model reference -> resolved commit sha (``None`` for local folders).
        base_id: the Hub id of a local base (see :func:`named_base`), for ``base_model``.
    """
    recipe = report["recipe"]
    method = get_method(report["method"])
    base = recipe.get("base_model")
    refs = ([base] if base else []) + [m["model"] for m in recipe["models"]]
    hub_refs = [r.split("@")[0] for r in refs if _is_repo_id(r)]
    if base_id and base and not _is_repo_id(base):
        hub_refs.insert(0, base_id)
    front: dict[str, Any] = {}
    if hub_refs:
        front["base_model"] = list(dict.fromkeys(hub_refs))
        front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = list(dict.fromkeys(["merge", "ota_trainer", method.name]))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines.append(f"# {title or 'Merged model'}")
    lines.append("")
    lines.append(
        f"Merged with [ota_trainer](https://arxiv.org/abs/2509.11167) {__version__} using **{method.pretty_name}** "
        f"([reference]({method.reference_url})): {method.description}."
    )
    lines += ["", "## Sources", "", "| role | model | commit | FFG density kept |", "| --- | --- | --- | --- |"]
    if base:
        lines.append(f"| base | `{base}` | `{sources.get(base) or 'local'}` | - |")
    for m, e in zip(recipe["models"], report["experts"]):
        dens = (
            f"{e['density']:.4f}"
            if e.get("grafted")
            else "1 (no moments: FFG not applied, every edit kept)"
            if e.get("no_moments")
            else "-"
        )
        lines.append(f"| expert | `{m['model']}` | `{sources.get(m['model']) or 'local'}` | {dens} |")
    pinned = report.get("pinned_recipe") or recipe
    lines += ["", "## Recipe", "", "Every source pinned to its commit, every parameter with the value used:"]
    lines += ["", "```yaml", yaml.safe_dump(pinned, sort_keys=False).strip(), "```", ""]
    lines.append(
        f"Reproduce (`pip install ota_trainer=={report.get('library_version', __version__)}`): "
        f"`ota-merge {RECIPE_FILE} merged/`"
    )
    lines.append("")
    return "\n".join(lines)
