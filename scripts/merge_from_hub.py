#!/usr/bin/env python
"""Merge experts with OTA + Fast Fisher Grafting (or a baseline) into one Hugging Face model.

    python scripts/merge_from_hub.py --base BASE --expert E1 --expert E2 --method ota --density 0.4 --out OUT
    python scripts/merge_from_hub.py --recipe recipe.yaml --out OUT

Run with --help for every flag.
"""
import importlib.util
import os
import sys
from pathlib import Path

# Before PyTorch loads (a second or more): start reading local inputs into the page cache, so
# the disk works while the interpreter starts. readahead.py is standard library only and is
# loaded by path, since importing the package would import PyTorch first.
_spec = importlib.util.spec_from_file_location(
    "_ota_readahead", Path(__file__).resolve().parents[1] / "ota_trainer" / "readahead.py"
)
if _spec is not None and _spec.loader is not None and Path(_spec.origin).is_file():
    _readahead = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_readahead)
    _readahead.start([_readahead.model_files(m) for m in _readahead.local_models_in_args(sys.argv[1:])], touch=True)
# The engine runs its own threads; idle OpenMP workers should sleep, not spin on our cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ota_trainer.cli.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
