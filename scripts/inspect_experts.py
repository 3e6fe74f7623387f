#!/usr/bin/env python
"""Diagnostics of experts before merging: where FFG cuts and how their curvature overlaps.

The same command as ``ota-inspect`` (installed with the package): ``ota_trainer/cli/inspect.py``.
"""

import sys

from ota_trainer.cli.inspect import main

if __name__ == "__main__":
    sys.exit(main())
