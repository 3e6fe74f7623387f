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
# Every merge counts FFG's histograms itself (test_ffg_cache.py turns the cache on): a cache shared
# between tests would route later merges of the same inputs around the counting they test.
os.environ.setdefault("OTA_TRAINER_FFG_CACHE", "0")

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


BACKENDS = ("native", "torch", "no-torch")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run a property on every backend: ``backend.merge(recipe, out)`` merges with the native kernels
    (when they cover the recipe, else the test is skipped), pure PyTorch (native kernels off), or a
    CLI process that must never import PyTorch (native-covered recipes only)."""
    return _Backend(request.param, monkeypatch)


class _Backend:
    def __init__(self, name, monkeypatch):
        self.name, self._mp = name, monkeypatch

    def merge(self, recipe, out):
        import json
        import subprocess
        import sys

        from ota_trainer import merge
        from ota_trainer.backends.native.backend import NativeBackend
        from ota_trainer.merger import as_recipe
        from ota_trainer.merger.inputs import open_inputs
        from ota_trainer.merger.report import local_resolver

        recipe = as_recipe(recipe)
        if self.name == "torch":
            self._mp.setenv("OTA_TRAINER_NATIVE", "0")
            try:
                return merge(recipe, out, quiet=True, fast_path=False)
            finally:
                self._mp.delenv("OTA_TRAINER_NATIVE")
        reason = NativeBackend.covers(recipe, open_inputs(recipe, local_resolver))
        if reason is not None:
            pytest.skip(f"the native kernels do not cover this recipe: {reason}")
        if self.name == "native":
            return merge(recipe, out, quiet=True)
        path = Path(out).parent / f"{Path(out).name}.recipe.yaml"
        path.write_text(recipe.to_yaml())
        code = (
            "import sys; from ota_trainer.cli.merge import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'PyTorch was loaded'; sys.exit(rc)"
        )
        subprocess.run(
            [sys.executable, "-c", code, "--recipe", str(path), "--out", str(out), "--quiet"],
            check=True,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        )
        return json.loads((Path(out) / "ota_merge_report.json").read_text())
