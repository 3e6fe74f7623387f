"""Merge experts into one model.

Examples::

    # flags
    python scripts/merge_from_hub.py --base base/ --expert math/ --expert code/ \\
        --method ota --density 0.4 --out merged/

    # a YAML recipe (mergekit-like shape, see ota_trainer.merger.recipe)
    python scripts/merge_from_hub.py --recipe recipe.yaml --out merged/

    # any method parameter: --param key=value (repeatable); per-expert: --expert-param 1:density=0.3
    python scripts/merge_from_hub.py --base base/ --expert a/ --expert b/ --method dare \\
        --param drop_rate=0.7 --out merged/

An ota_trainer error exits with status 2 and one line on stderr; nothing is left at --out.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["make_parser", "recipe_from_args", "main"]

_PARAM_DEST = "param__"  # argparse dest prefix of the flags generated from the methods' parameters


def _add_method_flags(group) -> None:
    """One flag per parameter any method declares (:func:`ota_trainer.merger.methods.cli_params`):
    ``--NAME`` (``--no-NAME`` for a boolean that defaults to true), typed and checked by the
    method when the recipe is built; per-expert-only parameters are set with --expert-param."""
    from ..merger.methods import cli_params

    for name, (p, users) in cli_params().items():
        if name == "weight":
            continue  # per expert: --expert-param I:weight=W
        by_help: dict[tuple[str, Any], list[str]] = {}  # methods sharing one meaning and default
        for m in users:
            q = _param_of(m, name)
            by_help.setdefault((q.help, None if q.kind is bool else q.default), []).append(m)
        text = "; ".join(
            f"{', '.join(ms)}: {h}" + (f" (default {d})" if d is not None else "") for (h, d), ms in by_help.items()
        )
        flag = "--" + name.replace("_", "-")
        if p.kind is bool:
            if p.default:
                group.add_argument(
                    "--no-" + name.replace("_", "-"),
                    dest=_PARAM_DEST + name,
                    action="store_false",
                    default=None,
                    help=f"{name}=false ({text})",
                )
            else:
                group.add_argument(flag, dest=_PARAM_DEST + name, action="store_true", default=None, help=text)
        else:
            group.add_argument(
                flag,
                dest=_PARAM_DEST + name,
                type=p.kind,
                choices=p.choices,
                default=None,
                metavar=None if p.choices else name.upper(),
                help=text,
            )


def _param_of(method: str, name: str):
    from ..merger.methods import METHODS

    return METHODS[method].param(name)


def make_parser() -> argparse.ArgumentParser:
    from ..merger.methods import METHODS
    from .common import add_common_flags

    p = argparse.ArgumentParser(
        description="Merge fine-tuned experts with OTA + Fast Fisher Grafting or a baseline.",
        usage="%(prog)s [RECIPE OUT] [--recipe RECIPE] [--base BASE] [--expert E [E ...]] [--out OUT] [options]",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "positional",
        nargs="*",
        metavar="RECIPE OUT",
        help="mergekit's form: a recipe and the output folder (same as --recipe RECIPE --out OUT)",
    )
    add_common_flags(p)
    src = p.add_argument_group("inputs (a recipe, or --base/--expert/--method)")
    src.add_argument("--recipe", help="YAML recipe (method, base_model, models, parameters, dtype, options)")
    src.add_argument("--base", help="base model folder")
    src.add_argument(
        "--expert",
        action="extend",
        nargs="+",
        default=[],
        metavar="E",
        help="expert folder(s) or repo id(s): --expert A B, or --expert A --expert B",
    )
    src.add_argument(
        "--weight",
        type=float,
        nargs="+",
        metavar="W",
        help="each expert's weight c_t, in --expert order (a recipe's per-model weight)",
    )
    src.add_argument("--method", choices=sorted(METHODS), help="merge method (default: ota)")
    par = p.add_argument_group("method parameters (override the recipe's top-level parameters)")
    _add_method_flags(par)
    par.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="any method parameter")
    par.add_argument(
        "--expert-param", action="append", default=[], metavar="I:KEY=VALUE", help="parameter of expert I (0-based)"
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", help="output folder (written atomically; or give it as the second positional)")
    out.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    out.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: the base's)")
    out.add_argument("--shard-size", help="output shard size, e.g. 5GB (default 5GB)")
    out.add_argument(
        "--out-adapter-rank",
        type=int,
        metavar="R",
        help="LoRA experts: also write <out>/adapter/, a rank-R LoRA adapter of the merged edit (truncated SVD per "
        "module; the report gives each module's reconstruction error)",
    )
    out.add_argument(
        "--allow-missing-moments",
        action="store_true",
        default=None,
        help="uniform curvature where moments are missing (warns)",
    )
    hub = p.add_argument_group("Hub (models may be repo ids: org/name or org/name@revision)")
    hub.add_argument(
        "--push-to-hub", metavar="REPO", help="upload the merged folder to this repo in one commit, with a model card"
    )
    hub.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    hub.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (resolved shas, files, bytes, memory) and run every check that needs no tensor "
        "data; downloads configs only",
    )
    return p


def _kv(text: str, flag: str) -> tuple[str, Any]:
    import yaml

    from ..errors import ConfigError, brief

    if "=" not in text:
        raise ConfigError(f"{flag} {brief(text)}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"{flag} {brief(text)}: the value is not plain YAML ({brief(str(e))})") from None


def recipe_from_args(args: argparse.Namespace):
    """Build the :class:`MergeRecipe` the flags describe (recipe file first, flags on top)."""
    from ..errors import ConfigError
    from ..merger.recipe import MergeRecipe

    if args.positional:
        if len(args.positional) != 2 or args.recipe or args.out:
            raise ConfigError(
                f"positional arguments {args.positional}: give RECIPE OUT (mergekit's form), "
                "or --recipe RECIPE --out OUT, not both"
            )
        args.recipe, args.out = args.positional
        args.positional = []
    if not args.out:
        raise ConfigError("no output folder: give --out OUT (or RECIPE OUT)")
    if args.recipe:
        if args.base or args.expert:
            raise ConfigError("give either --recipe or --base/--expert, not both")
        data = MergeRecipe.from_yaml(args.recipe).to_dict()
    else:
        if not args.expert:
            raise ConfigError("give --recipe, or --expert (one per expert) with --base")
        data = {"method": args.method or "ota", "base_model": args.base, "models": [{"model": e} for e in args.expert]}
    if args.recipe and args.method:
        data["method"] = args.method
    params = dict(data.get("parameters") or {})
    for dest, value in vars(args).items():
        if dest.startswith(_PARAM_DEST) and value is not None:
            params[dest[len(_PARAM_DEST) :]] = value
    for text in args.param:
        k, v = _kv(text, "--param")
        params[k] = v
    data["parameters"] = params
    if args.weight:
        if len(args.weight) != len(data["models"]):
            raise ConfigError(f"--weight: {len(args.weight)} weight(s) for {len(data['models'])} expert(s)")
        for model, w in zip(data["models"], args.weight):
            model.setdefault("parameters", {})["weight"] = w
    for text in args.expert_param:
        idx, _, rest = text.partition(":")
        if not idx.isdigit() or int(idx) >= len(data["models"]):
            raise ConfigError(f"--expert-param {text!r}: expected I:KEY=VALUE with I in 0..{len(data['models']) - 1}")
        k, v = _kv(rest, "--expert-param")
        data["models"][int(idx)].setdefault("parameters", {})[k] = v
    options = dict(data.get("options") or {})
    if args.allow_missing_moments:
        options["allow_missing_moments"] = True
    if args.shard_size:
        options["shard_size"] = args.shard_size
    if args.out_adapter_rank is not None:
        options["out_adapter_rank"] = args.out_adapter_rank
    data["options"] = options
    if args.dtype:
        data["dtype"] = args.dtype
    if not data.get("base_model"):  # LoRA adapter experts name their base (adapter_config.json only is read)
        from ..hub import HubResolver
        from ..merger.adapters import fill_base_model

        data = fill_base_model(data, HubResolver(need_moments=False).adapter_config)
    return MergeRecipe.from_dict(data)


def describe_plan(recipe, resolver, plans: dict[str, list]) -> str:
    """The --dry-run text: resolved shas, files and bytes to download, options, peak memory estimate."""
    lines = [f"method: {recipe.method} ({recipe.spec.pretty_name})", f"method parameters: {recipe.method_parameters()}"]
    refs = ([("base", recipe.base_model)] if recipe.base_model else []) + [
        (f"expert {i}", m.model) for i, m in enumerate(recipe.models)
    ]
    total = 0
    for role, ref in refs:
        sha = resolver.sha(ref)
        files = plans[ref]
        if resolver.ref(ref).is_local:
            lines.append(f"{role}: {ref} (local folder); {len(files)} files")
        else:
            todo = sum(size or 0 for _, size, cached in files if not cached)
            total += todo
            lines.append(f"{role}: {ref} -> {sha}; {len(files)} files, {_fmt(todo)} to download")
        for name, size, cached in files:
            tag = "" if resolver.ref(ref).is_local else "  (cached)" if cached else ""
            lines.append(f"    {name}  {_fmt(size or 0)}{tag}")
        if role.startswith("expert"):
            lines.append(f"    options: {recipe.model_parameters(int(role.split()[1]))}")
    lines.append(f"total to download: {_fmt(total)}")
    largest = _largest_tensor(recipe, resolver)
    if largest:
        name, numel = largest
        t = len(recipe.models)
        # the PyTorch path's fp32 working set (base + per expert: weights, v_hat, saliency/mask) + accumulators,
        # and FFG histograms of 16 MB per expert; the native kernels need less (inputs are mapped, not copied)
        peak = numel * 4 * (3 + 3 * t) + (16 * 2**20 * t if recipe.method == "ota" else 0)
        lines.append(f"estimated peak memory: {_fmt(peak)} (largest tensor {name}, {numel:,} entries, {t} experts)")
    else:
        lines.append("estimated peak memory: unknown (tensor headers not readable)")
    return "\n".join(lines)


def dry_run_checks(recipe, resolver, plans: dict[str, list]) -> str:
    """Every check the merge runs before it reads tensor data, on configs and headers only:
    architectures (configs), then - when every input is a local folder or fully cached - names,
    shapes, dtypes and the moments (presence, names, shapes, metadata, scale) through the same
    :func:`~ota_trainer.merger.inputs.open_inputs` the merge uses. Downloads configs only.

    Raises:
        IncompatibleModelsError, MissingMomentsError, FormatError, ...: what the merge would raise.
    """
    from ..hub import check_architectures
    from ..merger.inputs import open_inputs

    refs = recipe.refs
    check_architectures(resolver, recipe.base_model, [m.model for m in recipe.models])
    absent = [r for r in refs if not resolver.ref(r).is_local and not all(c for _, _, c in plans[r])]
    if absent:
        return (
            "checks: architectures agree; names, shapes, dtypes and moments are checked from the weight files' "
            f"headers once they are downloaded (not in the cache: {', '.join(absent)})"
        )
    adapters = [r for r in refs[1:] if resolver.adapter_config(r) is not None]
    if adapters:  # LoRA adapters: their factors against the base's tensors (headers only)
        import dataclasses

        from ..io.folders import open_model
        from ..merger.adapters import check_adapter, open_adapter

        base = open_model(resolver(recipe.base_model), recipe.base_model)
        for r in adapters:
            check_adapter(open_adapter(resolver(r), r), base)
        rest = tuple(m for m in recipe.models if m.model not in adapters)
        recipe = dataclasses.replace(recipe, models=rest) if rest else None
    if recipe is not None:
        open_inputs(recipe, resolver)  # headers only: no tensor data is read
    moments = recipe is not None and recipe.spec.needs_moments
    return (
        "checks passed: architectures, tensor names, shapes and dtypes"
        + (", moments (present, for these weights, valid metadata, comparable scale)" if moments else "")
        + (f"; {len(adapters)} LoRA adapter(s) against the base's tensors" if adapters else "")
    )


def _fmt(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} GB"


def _largest_tensor(recipe, resolver):
    """Largest tensor of the template model, from safetensors headers only (range requests for repo ids)."""
    ref_text = recipe.base_model or recipe.models[0].model
    ref = resolver.ref(ref_text)
    try:
        if ref.is_local:
            from ..io.checkpoint import ModelFolder

            infos = [(t.name, t.numel) for t in ModelFolder(ref.local).tensors.values()]
        else:
            from huggingface_hub import get_safetensors_metadata

            meta = get_safetensors_metadata(ref.repo_id, revision=resolver.sha(ref_text))
            infos = [(n, _numel(i.shape)) for f in meta.files_metadata.values() for n, i in f.tensors.items()]
    except Exception:  # best effort: the estimate is informative only
        return None
    return max(infos, key=lambda x: x[1]) if infos else None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str] | None = None) -> int:
    from .common import configure_logging

    args = make_parser().parse_args(argv)
    configure_logging(args)
    from ..errors import OTAError

    try:
        recipe = recipe_from_args(args)
        from ..hub import HubResolver, merge, publish_folder

        resolver = HubResolver(need_moments=recipe.spec.needs_moments)
        if args.dry_run:
            plans = {r: resolver.plan(r) for r in recipe.refs}  # files per input, listed once
            print(describe_plan(recipe, resolver, plans))
            print(dry_run_checks(recipe, resolver, plans))
            return 0
        # --out checked (never an input, the HF cache or a file) and locked before anything is read;
        # configs compared before any weights are downloaded; then the one runner (native kernels
        # when they cover the recipe, no PyTorch; else PyTorch, loaded only then)
        report = merge(
            recipe,
            args.out,
            overwrite=args.overwrite,
            quiet=args.quiet,
            resolver=resolver,
            extra_inputs=[args.recipe] if args.recipe else [],
        )
        if args.push_to_hub:
            sha = publish_folder(
                report.out_dir,
                args.push_to_hub,
                private=args.private,
                commit_message=f"Merge with ota_trainer ({report.method})",
            )
            print(f"pushed {report.out_dir} to {args.push_to_hub} (commit {sha})")
    except OTAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for e in report.experts:
        if e.grafted:
            rule = (
                f"target density {e.density_target}"
                if e.density_target is not None
                else (f"saliency share {e.saliency_share}" if e.saliency_share is not None else "absolute threshold")
            )
            print(f"{e.model}: FFG kept {e.density:.4f} of {e.total} entries ({rule})")
    print(f"merged ({report.method}) into {report.out_dir} in {report.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
