#!/usr/bin/env python
"""Train a capability expert with TRL's SFTTrainer and OTACallback (merge-ready checkpoints).

The same command as ``ota-train-sft`` (installed with the package): ``ota_trainer/cli/train_sft.py``.
"""

import sys

from ota_trainer.cli.train_sft import main

if __name__ == "__main__":
    sys.exit(main())
