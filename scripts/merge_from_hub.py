#!/usr/bin/env python
"""Merge experts with OTA + Fast Fisher Grafting (or a baseline) into one Hugging Face model.

    python scripts/merge_from_hub.py --base BASE --expert E1 --expert E2 --method ota --density 0.4 --out OUT
    python scripts/merge_from_hub.py --recipe recipe.yaml --out OUT

Run with --help for every flag.
"""
import sys

from ota_trainer.cli.merge import main

if __name__ == "__main__":
    sys.exit(main())
