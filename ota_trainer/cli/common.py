"""Conventions every command line of ours shares: ``--version``, ``-v/--verbose``, ``-q/--quiet``
and ``--log-level``, with logging configured for our own loggers only (a merge from the Hub does
not print every HTTP request the Hub client makes)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["add_common_flags", "configure_logging"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_common_flags(p: argparse.ArgumentParser) -> None:
    from .. import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s (ota_trainer {__version__})")
    g = p.add_argument_group("output verbosity")
    x = g.add_mutually_exclusive_group()
    x.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    x.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only; no progress bars (ours or downloads)"
    )
    x.add_argument("--log-level", choices=LEVELS, type=str.upper, help="our loggers' level (default INFO)")


def configure_logging(args: argparse.Namespace, *names: str) -> int:
    """Set up the ``ota_trainer`` logger (and ``names``) as the flags say; returns the level. Other
    libraries' loggers keep their own settings (warnings still reach stderr through Python's
    last-resort handler). ``--quiet`` also turns off huggingface_hub's download bars."""
    level = (
        logging.DEBUG
        if args.verbose
        else logging.WARNING
        if args.quiet
        else getattr(logging, args.log_level)
        if args.log_level
        else logging.INFO
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("ota_trainer", *names):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]  # records still propagate: to nothing in a CLI (the root logger has no
        log.setLevel(level)  # handler there), to the application's handlers when main() is called in-process
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
        if "huggingface_hub" in sys.modules:  # already imported: tell it (a local merge never imports it: 80 ms)
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    return level
