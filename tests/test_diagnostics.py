"""Diagnostics on tiny experts whose moments are built by hand, so every answer is known."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ota_trainer import ConfigError, save_moments
from ota_trainer.diagnostics import (
    cosine,
    fraction_histogram,
    inspect_experts,
    jaccard,
    line_kept_fractions,
    parse_name,
    rank1_relative_error,
    top_fraction_mask,
    write_diagnostics,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "inspect_experts.py"
DENSITY = 0.4


def _expert(base: Path, path: Path, *, seed: int, moments=None, compression: str = "rank1") -> Path:
    """base + a random task vector, saved with safetensors; ``moments(name, shape) -> v`` written with save_moments."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    weights = {
        n: w + 0.02 * torch.randn(w.shape, generator=g) for n, w in load_file(str(base / "model.safetensors")).items()
    }
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(base / "config.json", path / "config.json")
    if moments is not None:
        save_moments(
            path,
            {n: moments(n, w.shape) for n, w in weights.items()},
            compression=compression,
            metadata={"beta2": 0.999, "step": 100},
        )
    return path


def _random_v(seed: int):
    """Adam-like positive moments spanning several orders of magnitude, the same for a given seed."""

    def make(name, shape):
        g = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, name)))
        return torch.exp(torch.randn(shape, generator=g) * 2.0 - 20.0)

    return make


def _zero_qk(name, shape):
    return torch.zeros(shape) if parse_name(name)[1] in ("q", "k") else _random_v(5)(name, shape)


def _region(first: bool):
    """Large curvature on the first (or last) 10% of entries, tiny distinct values elsewhere: disjoint top-10% sets."""

    def make(name, shape):
        n = torch.Size(shape).numel()
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        v = 1e-9 * (1 + torch.rand(n, generator=g))
        hi = slice(0, n // 10 + 1) if first else slice(n - n // 10 - 1, n)
        v[hi] = 1e-3 * (1 + torch.rand(v[hi].shape, generator=g))
        return v.reshape(shape)

    return make


def _exact_rank1(name, shape):
    """outer(a, b) of positive vectors: rank-one compression loses nothing."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if len(shape) == 1:
        return torch.exp(torch.randn(shape, generator=g) - 18)
    a = torch.exp(torch.randn(shape[0], generator=g))
    b = torch.exp(torch.randn(shape[1], generator=g) - 18)
    return torch.outer(a, b)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which costs ~1000x on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from ota_trainer.testing.tiny import make_tiny_base

    root = tmp_path_factory.mktemp("diag")
    base = make_tiny_base(root / "base", seed=0)
    return {
        "root": root,
        "base": base,
        "zero_qk": _expert(base, root / "zero_qk", seed=1, moments=_zero_qk),
        "same_a": _expert(base, root / "same_a", seed=2, moments=_random_v(3)),
        "same_b": _expert(base, root / "same_b", seed=3, moments=_random_v(3)),
        "first": _expert(base, root / "first", seed=4, moments=_region(True), compression="full"),
        "last": _expert(base, root / "last", seed=5, moments=_region(False), compression="full"),
        "rank1_exact": _expert(base, root / "rank1_exact", seed=6, moments=_exact_rank1, compression="full"),
        "random_full": _expert(base, root / "random_full", seed=8, moments=_random_v(4), compression="full"),
        "no_moments": _expert(base, root / "no_moments", seed=7),
    }


# -- pure functions ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, want",
    [
        ("model.layers.3.self_attn.q_proj.weight", (3, "q")),
        ("model.layers.3.self_attn.k_proj.bias", (3, "k")),  # Qwen2 biases
        ("model.layers.0.self_attn.v_proj.weight", (0, "v")),
        ("model.layers.11.self_attn.o_proj.weight", (11, "o")),
        ("model.layers.2.mlp.gate_proj.weight", (2, "gate")),
        ("model.layers.2.mlp.up_proj.weight", (2, "up")),
        ("model.layers.2.mlp.down_proj.weight", (2, "down")),
        ("model.layers.1.block_sparse_moe.experts.4.w1.weight", (1, "gate")),  # Mixtral
        ("model.layers.1.block_sparse_moe.experts.4.w2.weight", (1, "down")),
        ("model.layers.1.block_sparse_moe.gate.weight", (1, "other")),  # router, not gate_proj
        ("model.layers.5.input_layernorm.weight", (5, "norm")),
        ("model.layers.5.self_attn.q_norm.weight", (5, "norm")),  # Qwen3
        ("model.norm.weight", (None, "norm")),
        ("model.embed_tokens.weight", (None, "embed")),
        ("lm_head.weight", (None, "lm_head")),
        ("model.rotary_emb.inv_freq", (None, "other")),
    ],
)
def test_parse_name(name, want):
    assert parse_name(name) == want


def test_pure_functions():
    v = torch.tensor([[0.0, 5.0, 1.0], [4.0, 0.0, 3.0]])
    assert top_fraction_mask(v, 0.34).tolist() == [[False, True, False], [True, False, False]]  # k = 2
    assert not top_fraction_mask(torch.zeros(3, 3), 0.5).any()  # zero curvature is never "top"
    a, b = torch.tensor([True, True, False, False]), torch.tensor([False, True, True, False])
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) is None
    x = torch.tensor([1e-30, 2e-30, 3e-30])  # would underflow if squared in float32
    assert cosine(x, 7 * x) == pytest.approx(1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine(torch.zeros(2), torch.ones(2)) is None
    rows, cols = line_kept_fractions(torch.tensor([[True, False], [False, False], [True, True]]))
    assert rows.tolist() == [0.5, 0.0, 1.0] and cols.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert fraction_histogram(torch.tensor([0.0, 0.5, 1.0, 0.99]), bins=4) == [1, 0, 1, 2]
    assert rank1_relative_error(torch.outer(torch.rand(5) + 0.1, torch.rand(4) + 0.1)) < 1e-6
    assert rank1_relative_error(torch.eye(4)) == pytest.approx(0.75**0.5, rel=1e-5)  # v_hat = 1/4 everywhere
    assert rank1_relative_error(torch.zeros(2, 2)) is None


def test_batched_histogram_equals_engine_histogram(monkeypatch):
    from ota_trainer.backends.torch.ffg import SaliencyHistogram
    from ota_trainer.diagnostics.measures import _BatchedHistogram

    monkeypatch.setattr(_BatchedHistogram, "_BATCH", 100)
    batched, engine = _BatchedHistogram(), SaliencyHistogram()
    g = torch.Generator().manual_seed(0)
    for n in (10, 50, 200, 30, 80, 1000, 5):
        x = torch.exp2(torch.randn(n, generator=g, dtype=torch.float64) * 10)
        x[::7] = 0.0  # zero saliency
        batched.add(x)
        engine.add(x)
    assert batched.threshold_for_density(0.3) == engine.threshold_for_density(0.3)
    assert torch.equal(batched.hist.counts, engine.counts)
    assert (batched.hist.zeros, batched.hist.total) == (engine.zeros, engine.total)


# -- end to end on tiny experts -----------------------------------------------------------------------
def test_ffg_cuts_where_curvature_is_zero_and_matches_merge(models, tmp_path):
    from ota_trainer import merge

    diag = inspect_experts(models["base"], [models["zero_qk"]], density=DENSITY, quiet=True)
    json.dumps(diag, allow_nan=False)
    e = diag["experts"][0]
    assert e["moments"] == "rank1" and e["rank1_quality"] is None
    assert e["ffg"]["density"] == pytest.approx(DENSITY, abs=2e-3)
    assert e["magnitude"]["density"] == pytest.approx(DENSITY, abs=2e-3)
    for role in ("q", "k"):
        assert e["ffg"]["by_role"][role]["fraction"] == 0.0
        assert 0.3 < e["magnitude"]["by_role"][role]["fraction"] < 0.5
        assert e["ffg"]["lines"][role]["rows_pruned_fraction"] == 1.0
        assert e["ffg"]["lines"][role]["cols_pruned_fraction"] == 1.0
        assert e["magnitude"]["lines"][role]["rows_pruned_fraction"] == 0.0
        assert sum(e["ffg"]["lines"][role]["row_hist"]) == e["ffg"]["lines"][role]["rows"]
    # the kept budget moves to the other roles
    assert all(e["ffg"]["by_role"][r]["fraction"] > DENSITY for r in ("v", "o", "gate", "up", "down"))
    cells = {(c["layer"], c["role"]): c["fraction"] for c in e["ffg"]["by_layer_role"]}
    assert cells[(0, "q")] == cells[(1, "k")] == 0.0
    assert [r["layer"] for r in e["ffg"]["by_layer"]] == [0, 1, None]
    assert diag["layers"] == [0, 1] and "q" in diag["roles"] and diag["pairs"] == []
    assert "q (0.0%)" in diag["findings"][0]
    # the same masks as the merge engine: per-tensor kept fractions agree exactly
    report = merge(
        {
            "method": "ota",
            "base_model": str(models["base"]),
            "models": [str(models["zero_qk"])],
            "parameters": {"density": DENSITY},
        },
        tmp_path / "merged",
        quiet=True,
    )
    assert report.experts[0].kept == e["ffg"]["kept"]
    for t in diag["tensors"]:
        assert t["ffg_kept"][0] == pytest.approx(report.tensor_density[t["name"]][0], abs=1e-12), t["name"]


def test_identical_moments_overlap_fully(models):
    m = models
    diag = inspect_experts(m["base"], [m["same_a"], m["same_b"], m["same_a"]], density=DENSITY, topk=0.1, quiet=True)
    same_v, same_expert = diag["pairs"][0], diag["pairs"][1]
    assert (same_v["a"], same_v["b"], same_expert["a"], same_expert["b"]) == (0, 1, 0, 2)
    curv = same_v["curvature"]
    assert curv["overall"]["jaccard"] == 1.0
    assert curv["overall"]["chance"] == pytest.approx(0.1 / 1.9, abs=0.01)
    assert curv["overall"]["cos_row"] == pytest.approx(1.0, abs=1e-9)
    assert curv["overall"]["cos_col"] == pytest.approx(1.0, abs=1e-9)
    assert all(
        r["jaccard"] == 1.0 and r["cos_factors"] == pytest.approx(1.0) for r in curv["by_layer"] if r["cos_factors"]
    )
    # the same expert twice: identical masks; different task vectors with the same v: partial overlap
    for kind in ("ffg", "magnitude"):
        assert same_expert["mask_overlap"][kind]["overall"]["jaccard"] == 1.0
        assert same_v["mask_overlap"][kind]["overall"]["jaccard"] < 1.0
    assert same_v["mask_overlap"]["magnitude"]["overall"]["jaccard"] == pytest.approx(
        0.25, abs=0.02
    )  # 0.4*0.4/(0.8-0.16)


def test_disjoint_top_curvature_gives_zero(models):
    diag = inspect_experts(models["base"], [models["first"], models["last"]], density=DENSITY, quiet=True)
    curv = diag["pairs"][0]["curvature"]
    assert curv["overall"]["jaccard"] == 0.0
    assert all(r["jaccard"] == 0.0 for r in curv["by_layer_role"])
    assert curv["overall"]["cos_row"] < 0.5  # row sums peak at opposite ends


def test_rank1_quality(models):
    diag = inspect_experts(
        models["base"], [models["rank1_exact"], models["random_full"], models["same_a"]], density=DENSITY, quiet=True
    )
    exact, random, stored_rank1 = (e["rank1_quality"] for e in diag["experts"])
    assert stored_rank1 is None
    assert exact["overall"]["rel_error_mean"] < 1e-5
    assert exact["overall"]["rel_error_pooled"] < 1e-5
    assert exact["overall"]["mask_jaccard"] == pytest.approx(1.0, abs=1e-4)
    assert "norm" not in exact["by_role"] or exact["by_role"]["norm"]["rel_error_mean"] is None  # 1-D: stored whole
    assert all(t["rel_error"] < 1e-5 for t in exact["by_tensor"])
    assert random["overall"]["rel_error_mean"] > 0.5  # i.i.d. log-normal entries: far from rank one
    assert random["overall"]["mask_jaccard"] < 0.99


def test_expert_without_moments_and_bad_input(models):
    m = models
    diag = inspect_experts(m["base"], [m["same_a"], m["no_moments"]], quiet=True)
    e = diag["experts"][1]
    assert e["moments"] is None and e["ffg"] is None and e["magnitude"]["density"] == pytest.approx(DENSITY, abs=2e-3)
    assert diag["pairs"][0]["curvature"] is None and diag["pairs"][0]["mask_overlap"]["ffg"] is None
    assert diag["pairs"][0]["mask_overlap"]["magnitude"] is not None
    with pytest.raises(ConfigError, match="density=0"):
        inspect_experts(m["base"], [m["same_a"]], density=0.0)
    with pytest.raises(ConfigError, match="topk=1"):
        inspect_experts(m["base"], [m["same_a"]], topk=1.0)
    seen = []
    inspect_experts(
        "BASE", ["E"], quiet=True, resolver=lambda ref: seen.append(ref) or {"BASE": m["base"], "E": m["same_a"]}[ref]
    )
    assert seen == ["BASE", "E"]


def test_library_works_without_matplotlib(models, tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "ota_trainer.diagnostics")
    diagnostics = importlib.import_module("ota_trainer.diagnostics")
    diag = diagnostics.inspect_experts(models["base"], [models["same_a"]], quiet=True)
    files = diagnostics.write_diagnostics(diag, tmp_path, plots=False)
    assert [f.name for f in files] == ["diagnostics.json", "summary.md"]
    with pytest.raises(ImportError, match=r"ota_trainer\[plots\]"):
        diagnostics.plot_diagnostics(diag, tmp_path)


def test_summary_tables(models, tmp_path):
    m = models
    diag = inspect_experts(m["base"], [m["rank1_exact"], m["same_a"]], quiet=True)
    write_diagnostics(diag, tmp_path, plots=False)  # the figures are checked through the CLI below
    assert json.loads((tmp_path / "diagnostics.json").read_text()) == json.loads(json.dumps(diag))
    summary = (tmp_path / "summary.md").read_text()
    for heading in (
        "## Reading",
        "## Experts",
        "## Kept fraction per role",
        "## Kept fraction per layer",
        "## Row and column sparsity",
        "## Curvature overlap",
        "## Mask overlap",
        "## Rank-one quality",
    ):
        assert heading in summary
    assert "| q | " in summary and "| rank1_exact | q |" in summary


# -- CLI ---------------------------------------------------------------------------------------------
def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see _one_thread
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_writes_outputs(models, tmp_path):
    m = models
    out = tmp_path / "diag"
    r = _cli(
        "--base",
        m["base"],
        "--expert",
        m["zero_qk"],
        "--expert",
        m["rank1_exact"],
        "--density",
        "0.3",
        "--topk",
        "0.05",
        "--out",
        out,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "FFG keeps" in r.stdout
    pngs = [f"{kind}_e{i}.png" for kind in ("kept_fraction", "row_col_hist") for i in range(2)]
    pngs += ["curvature_overlap.png", "mask_overlap.png", "rank1_quality.png"]
    assert sorted(f.name for f in out.iterdir()) == sorted(["diagnostics.json", "summary.md", *pngs])
    assert all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in pngs)
    assert "![rank1_quality](rank1_quality.png)" in (out / "summary.md").read_text()
    diag = json.loads((out / "diagnostics.json").read_text())
    assert {"models", "density", "topk", "layers", "roles", "experts", "pairs", "tensors", "findings"} <= set(diag)
    assert diag["density"] == 0.3 and diag["topk"] == 0.05 and len(diag["pairs"]) == 1
    assert {"ffg", "magnitude", "rank1_quality", "moments"} <= set(diag["experts"][0])
    assert {"by_role", "by_layer", "by_layer_role", "lines", "threshold_log2", "density"} <= set(
        diag["experts"][0]["ffg"]
    )
    assert {"curvature", "mask_overlap"} <= set(diag["pairs"][0])


def test_cli_error_is_one_line(models, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("inspect_experts_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(
        [
            "--base",
            str(models["base"]),
            "--expert",
            str(models["same_a"]),
            "--density",
            "1.5",
            "--out",
            str(tmp_path / "bad"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: density=1.5 must be in (0, 1]")
    assert (
        script.main(
            [
                "--base",
                str(tmp_path / "nowhere"),
                "--expert",
                str(models["same_a"]),
                "--out",
                str(tmp_path / "x"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "no such folder" in capsys.readouterr().err
