#!/usr/bin/env python
"""Fuzz everything a merge reads, for as long as you like (issue #13).

    python scripts/fuzz_inputs.py --cases 2000            # a fixed seed (0): the same cases every run
    python scripts/fuzz_inputs.py --cases 20000 --seed 7  # other cases

Each case damages a tiny valid merge (base + two experts) with one to three mutations of
headers, metadata, bytes, values, index files, config.json, links or the recipe
(``tests/fuzzing.py``) and checks that the merge ends in a clean one-line OTAError with
nothing left behind, or in exactly the pure PyTorch engine's merge. Prints how the cases
ended and every failure found (with hypothesis's shrunk example); exits 1 if any.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class _HintCounter(logging.Handler):
    """Counts the runner's and the shipped-histogram reader's messages (the cases run with the
    package's loggers at ERROR: these two are set to INFO and kept to this handler)."""

    MESSAGES = {
        "used": "FFG histogram shipped with the expert",
        "ignored": "ignoring its FFG histogram",
        "redone": "merging again from a fresh count",
    }

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: collections.Counter[str] = collections.Counter()
        for name in ("ota_trainer.merger.runner", "ota_trainer.merger.ffg_shipped"):
            log = logging.getLogger(name)
            log.setLevel(logging.INFO)
            log.propagate = False
            log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for key, message in self.MESSAGES.items():
            if message in text:
                self.counts[key] += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1000, help="cases to run (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    args = p.parse_args(argv)

    import torch
    from fuzzing import build_template, check_case, mutations, recipes
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    torch.set_num_threads(1)
    outcomes: collections.Counter[str] = collections.Counter()
    hints = _HintCounter()  # what the experts' shipped FFG histograms did (the template's ship them)
    with tempfile.TemporaryDirectory(prefix="ota-fuzz-template-") as root:
        template = build_template(Path(root) / "template")

        @seed(args.seed)
        @settings(
            max_examples=args.cases,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(recipe=recipes(), changes=st.lists(mutations, min_size=1, max_size=3))
        def run(recipe, changes):
            outcomes[check_case(template, recipe, changes)] += 1

        start = time.perf_counter()
        failed = None
        try:
            run()
        except Exception as e:  # noqa: BLE001 - hypothesis re-raises the shrunk failure
            failed = e
        seconds = time.perf_counter() - start
    total = sum(outcomes.values())
    print(f"{total} cases (seed {args.seed}) in {seconds:.0f} s; CPU: {cpu_description()}")
    for name, n in outcomes.most_common():
        print(f"  {name:<26} {n:>6}  ({n / max(total, 1):.0%})")
    print(
        f"shipped FFG histograms: used for {hints.counts['used']} experts, ignored as damaged "
        f"{hints.counts['ignored']} times; their proof failed and the merge was redone {hints.counts['redone']} times"
    )
    if failed is not None:
        import traceback

        print("FOUND (hypothesis's shrunk cases, with the mutations applied):")
        traceback.print_exception(failed, file=sys.stdout)
        return 1
    print("found: nothing (every case ended in a clean OTAError or in the PyTorch engine's merge)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
