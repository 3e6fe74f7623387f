"""Shared fixtures: tiny random Llama models, experts and moments built from configs (no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# the demo's task code lives beside the scripts that use it (scripts/ota_demo), not in the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny tensors: one thread is faster than two (thread start-up dominates), also in CLI subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

try:  # the loopback Hub fixture (ota_trainer.testing.pytest_fixtures), when present
    from ota_trainer.testing.pytest_fixtures import *  # noqa: F401,F403,E402
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny base and three experts: two with full moments, one with rank-one moments."""
    from ota_trainer.testing.tiny import make_tiny_base, make_tiny_expert

    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_base(root / "base", seed=0)
    return {
        "root": root,
        "base": base,
        "e1": make_tiny_expert(base, root / "e1", seed=1, moments="full"),
        "e2": make_tiny_expert(base, root / "e2", seed=2, moments="full", step=50),
        "e3": make_tiny_expert(base, root / "e3", seed=3, moments="rank1"),
    }


@pytest.fixture(scope="session")
def bf16_models(tmp_path_factory):
    """A bf16 base (hidden 96) and experts with rank-one (e1), full (e2) and no (e3) moments."""
    from ota_trainer.testing.tiny import make_tiny_base, make_tiny_expert

    root = tmp_path_factory.mktemp("bf16")
    base = make_tiny_base(root / "base", seed=0, dtype=torch.bfloat16, hidden=96)
    return {
        "base": base,
        "e1": make_tiny_expert(base, root / "e1", seed=1, moments="rank1"),
        "e2": make_tiny_expert(base, root / "e2", seed=2, moments="full"),
        "e3": make_tiny_expert(base, root / "e3", seed=3, moments=None),
    }
