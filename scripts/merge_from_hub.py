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

from ota_trainer.io import readahead  # noqa: E402 - light: no PyTorch

# First thing: the disk starts reading the local inputs the command line names (in the order the
# merge reads them) while the interpreter parses the recipe. PyTorch is imported only if the
# native kernels do not cover the recipe (ota_trainer.merger.runner).
readahead.start([readahead.model_files(m) for m in readahead.local_models_in_args(sys.argv[1:])], touch=True)

from ota_trainer.cli.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
