"""Diagnostics of experts before merging: where FFG cuts and how their curvature overlaps.

    ota-inspect --base BASE --expert MATH --expert CODE --out diag/
    ota-inspect --base BASE --expert MATH CODE --density 0.2 --topk 0.05 --out diag/
    ota-inspect --base BASE --expert MATH --no-plots --out diag/   # without matplotlib

Writes into --out: diagnostics.json (every number), summary.md (tables and a short reading)
and PNG figures (kept fraction per layer x role, row/column kept fraction, pairwise curvature
and mask overlap, rank-one quality when an expert has full moments). The figures need
matplotlib: pip install 'ota_trainer[plots]'.

An ota_trainer error exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys


def make_parser() -> argparse.ArgumentParser:
    from .common import add_common_flags

    p = argparse.ArgumentParser(
        description="Where Fast Fisher Grafting cuts and how experts' curvature overlaps "
        "(diagnostics.json, summary.md, PNGs).",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, help="base model folder or Hub repo id (org/name[@revision])")
    p.add_argument(
        "--expert",
        action="extend",
        nargs="+",
        required=True,
        metavar="DIR",
        help="expert folder(s) or repo id(s), with ota/moments.safetensors for the FFG and curvature diagnostics "
        "(repeatable)",
    )
    p.add_argument(
        "--density",
        type=float,
        default=0.4,
        help="fraction of each expert's entries kept by FFG and by magnitude pruning, global threshold (default 0.4)",
    )
    p.add_argument(
        "--topk",
        type=float,
        default=0.1,
        help="fraction of each tensor's entries counted as top curvature (default 0.1)",
    )
    p.add_argument(
        "--no-bias-correction",
        dest="bias_correction",
        action="store_false",
        help="use v as stored (default: divide by 1 - beta2**step, as the merge does)",
    )
    p.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    p.add_argument(
        "--no-plots", action="store_true", help="write diagnostics.json and summary.md only (no matplotlib needed)"
    )
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from .common import configure_logging

    args = make_parser().parse_args(argv)
    configure_logging(args)
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print(
            "error: the figures need matplotlib: pip install 'ota_trainer[plots]', or pass --no-plots", file=sys.stderr
        )
        return 2
    from ..diagnostics import inspect_experts, write_diagnostics
    from ..errors import OTAError
    from ..hub import HubResolver

    try:
        diag = inspect_experts(
            args.base,
            args.expert,
            density=args.density,
            topk=args.topk,
            bias_correction=args.bias_correction,
            quiet=args.quiet,
            resolver=HubResolver(need_moments=True),
        )  # folders or repo ids (org/name[@rev])
        files = write_diagnostics(diag, args.out, plots=not args.no_plots)
    except OTAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in diag["findings"]:
        print(line)
    print(f"wrote {len(files)} files to {args.out}: {', '.join(f.name for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
