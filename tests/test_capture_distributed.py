"""Capture under multi-process training: DDP, FSDP2 and DeepSpeed ZeRO 1/2/3 (2 gloo ranks, CPU).

Each test launches a script from tests/dist_scripts/ with ``torchrun --nproc_per_node 2`` and
checks what it wrote against state the script read itself, or against a single-process run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ota_trainer.capture import check_moments_cover_weights
from ota_trainer.moments.compress import rank1_factors
from ota_trainer.moments.format import load_moments, moments_path

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def run(script: str, *args: str, nproc: int | None = 2, timeout: float = 240) -> None:
    """Run a dist script (under torchrun when ``nproc`` is given); fail with its output on error."""
    if nproc is None:
        cmd = [sys.executable, str(SCRIPTS / script), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29500 + os.getpid() % 1000),
            str(SCRIPTS / script),
            *args,
        ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")


def saved_names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def writers(out: Path) -> list[int]:
    """Ranks that wrote a moments file (recorded by the scripts)."""
    f = out.parent / f"{out.name}.writers"
    return [int(x) for x in f.read_text().split()] if f.is_file() else []


def raw(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(moments_path(folder)), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_rank1_close(
    folder, state: dict[str, torch.Tensor], *, rtol: float = 2e-6, aliases: dict | None = None
) -> None:
    """Row/column sums in the file match those of the gathered state (reduced shard-locally, so
    they agree up to float32 summation order). ``aliases``: tied names stored as copies."""
    t = raw(folder)
    meta = load_moments(folder).metadata
    state = dict(state)
    state.update({alias: state[name] for alias, name in (aliases or {}).items()})
    assert set(meta["parameters"]) == set(state)
    for name, v in state.items():
        if v.ndim >= 2:
            r, c = rank1_factors(v)
            torch.testing.assert_close(t[name + "::row"], r, rtol=rtol, atol=0)
            torch.testing.assert_close(t[name + "::col"], c, rtol=rtol, atol=0)
        else:
            assert torch.equal(t[name], v), name


def test_ddp_equals_single_process_with_the_same_global_batch(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run("ddp_train.py", str(ddp), "2")  # 2 ranks x 2 samples
    run("ddp_train.py", str(single), "4", nproc=None)  # 1 process x 4 samples
    assert writers(ddp) == [0, 0]  # only rank 0 wrote (checkpoint-3, then output_dir)
    s0 = torch.load(ddp / "state_rank0.pt")
    s1 = torch.load(ddp / "state_rank1.pt")
    ref = torch.load(single / "state_rank0.pt")
    assert s0["world_size"] == 2 and ref["world_size"] == 1
    got = load_moments(ddp)
    assert got.metadata["step"] == 3 and got.metadata["capture_engine"] == "local"
    for name, v in s0["state"].items():
        assert torch.equal(got[name], v), name  # exactly rank 0's optimizer state
        assert torch.equal(s1["state"][name], v), name  # every DDP rank holds the same state
        torch.testing.assert_close(v, ref["state"][name], rtol=1e-4, atol=1e-12)  # = single process (fp32 rounding)
    for folder in (ddp, ddp / "checkpoint-3"):
        assert load_moments(folder).metadata["step"] == 3


def test_fsdp2_sharded_capture(tmp_path):
    out = tmp_path / "fsdp2"
    run("fsdp2_capture.py", str(out))
    assert writers(out) == [0, 0]
    ref = torch.load(out / "reference.pt")
    assert ref["local_shapes"]["model.layers.1.mlp.up_proj.weight"] == (64, 64)  # really sharded: (128, 64) / 2
    full = load_moments(out / "full")
    assert full.metadata["capture_engine"] == "fsdp2" and full.metadata["world_size"] == 2
    assert full.metadata["frozen_parameters"] == ["model.layers.0.mlp.down_proj.weight"]
    assert full.metadata["tied_parameters"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert full.metadata["step"] == 3
    assert set(full.shapes) == set(ref["state"])
    for name, v in ref["state"].items():
        assert torch.equal(full[name], v), name
    assert_rank1_close(out / "rank1", ref["state"])


deepspeed_missing = importlib.util.find_spec("deepspeed") is None


@pytest.mark.skipif(
    deepspeed_missing,
    reason="deepspeed is not installed (optional extra: pip install deepspeed==0.19.8 --no-deps && "
    "pip install hjson py-cpuinfo ninja msgpack einops nvidia-ml-py)",
)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero(tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    run("deepspeed_train.py", str(out), str(stage), timeout=400)
    assert writers(out) == [0, 0, 0]  # checkpoint-3, output_dir (callback), full/ (script): rank 0 only
    ref = torch.load(out / "reference.pt")["state"]
    full = load_moments(out / "full")
    assert full.metadata["capture_engine"] == "deepspeed" and full.metadata["step"] == 3
    assert full.metadata["beta2"] == pytest.approx(0.999)
    assert full.metadata["frozen_parameters"] == ["model.layers.0.mlp.down_proj.weight"]
    for name, v in ref.items():
        assert torch.equal(full[name], v), name
    # ZeRO-1/2 save tied weights under both names (a state dict of clones), ZeRO-3 under one:
    # the moments follow the saved weights
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if stage < 3 else {}
    assert ("lm_head.weight" in full) == (stage < 3) == ("lm_head.weight" in saved_names(out))
    if tied:
        assert torch.equal(full["lm_head.weight"], ref["model.embed_tokens.weight"])
    # the callback's rank-one files: reduced from each rank's fragment of the flat state
    for folder in (out, out / "checkpoint-3"):
        assert_rank1_close(folder, ref, aliases=tied)
        meta = load_moments(folder).metadata
        assert meta["optimizer"] == "adamw_torch" and meta["compression"] == "rank1"
    frozen = full.metadata["frozen_parameters"]
    assert check_moments_cover_weights(out, frozen) == []
    assert check_moments_cover_weights(out / "checkpoint-3", frozen) == []


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_lora_exact_estimator_under_two_processes_is_adams_second_moment(tmp_path, mode):
    """The LoRA truth test on 2 ranks (DDP through the Trainer; FSDP2 with fully_shard): the
    step's G is summed over the ranks and averaged, as the optimizer sees the gradient, so the
    exact factors equal the row and column sums of Adam's exp_avg_sq for each adapted W."""
    pytest.importorskip("peft")
    out = tmp_path / mode
    run("lora_capture.py", mode, str(out))
    ref = torch.load(out / "reference.pt")
    assert ref["world"] == 2
    t = raw(out)
    assert {k.split("::")[0] for k in t} == set(ref["ref"]) and len(ref["ref"]) == 4
    for name, (r, c) in ref["ref"].items():
        torch.testing.assert_close(t[name + "::row"], r, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(t[name + "::col"], c, rtol=1e-5, atol=1e-12)
    meta = load_moments(out).metadata
    assert meta["capture"] == "lora" and meta["step"] == 3
