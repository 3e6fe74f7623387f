#!/usr/bin/env python
"""Merge experts with OTA + Fast Fisher Grafting (or a baseline) into one Hugging Face model.

    python scripts/merge_from_hub.py --base BASE --expert E1 --expert E2 --method ota --density 0.4 --out OUT
    python scripts/merge_from_hub.py --recipe recipe.yaml --out OUT

Run with --help for every flag.
"""
import os
import sys

# The engine runs its own threads; idle OpenMP workers should sleep, not spin on our cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Light: PyTorch is imported only once the arguments are parsed and the inputs' reads (and FFG's
# first pass, ota_trainer.prescan) have started.
from ota_trainer.cli.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
