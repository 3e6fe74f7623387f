"""The native kernels give the same bits as the engine's PyTorch path (and so the same merges)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ota_trainer import merge
from ota_trainer.backends import native
from ota_trainer.backends.native import ops
from ota_trainer.backends.torch.ffg import SaliencyHistogram, Score, Threshold, keep_mask
from ota_trainer.backends.torch.ops import Curvature, OTAAccumulator
from ota_trainer.merger.report import REPORT_FILE

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.why_unavailable()}"
)


def _inputs(m, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(m, n, generator=g) * 0.02).to(dtype)
    experts = [(w0.float() + torch.randn(m, n, generator=g) * 2e-3).to(dtype) for _ in range(3)]
    experts[1][0, :7] = w0[0, :7]  # unchanged entries: zero saliency
    a = torch.exp(torch.randn(m, generator=g) * 2 - 10)
    a[3] = 0.0  # a zero row of the moments
    b = torch.exp(torch.randn(n, generator=g) * 2 - 10)
    v = torch.exp(torch.randn(m, n, generator=g) * 2 - 20)
    return w0, experts, a, b, v


def _scores(a, b, v):
    return [Score.rank1(a, b), Score("full", v=v), Score("magnitude")]


def _torch_merge(w0, experts, masks, curvs, coefs, eps, out_dtype):
    """What the engine's PyTorch path computes, on the whole tensor as one block."""
    rows = slice(None)
    acc = OTAAccumulator(w0.float(), epsilon=eps)
    kept = []
    for e, mk, c, coef in zip(experts, masks, curvs, coefs):
        d = torch.sub(e, w0.float())
        mask = keep_mask(mk[0].block(d, rows), mk[1]) if mk else None
        kept.append(int(mask.sum()) if mask is not None else d.numel())
        acc.add(d, c.weights(rows, eps), mask, coef)
    return acc.result().to(out_dtype), kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_histogram_counts_equal_the_torch_histogram(dtype, threads, monkeypatch):
    if not ops.supports(dtype):
        pytest.skip(f"{dtype} unsupported by this compiler")
    monkeypatch.setattr(native, "MIN_PARALLEL", 1 << 10)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w0, experts, a, b, v = _inputs(97, 531, dtype)  # rows and columns not multiples of the kernel's chunk
        scores = _scores(a, b, v)
        hists = [SaliencyHistogram() for _ in scores]
        counter = ops.SaliencyCounter(hists)
        counter.add(w0, experts, scores)
        counter.add(w0, experts, [None, scores[1], None])  # an expert without a score is skipped
        counter.flush()
        for k, (e, s) in enumerate(zip(experts, scores)):
            want = SaliencyHistogram()
            for _ in range(2 if k == 1 else 1):
                want.add(s.block(torch.sub(e, w0.float()), slice(None)))
            assert torch.equal(hists[k].counts, want.counts) and hists[k].total == want.total, k
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize(
    "dtype,out_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
    ],
)
@pytest.mark.parametrize("power,normalise", [(0.5, "none"), (1.0, "mean"), (0.25, "mean")])
def test_ota_merge_is_bit_identical_to_the_torch_path(dtype, out_dtype, power, normalise, monkeypatch):
    if not ops.supports(dtype, out_dtype):
        pytest.skip(f"{dtype} unsupported by this compiler")
    monkeypatch.setattr(native, "MIN_PARALLEL", 1 << 10)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w0, experts, a, b, v = _inputs(211, 300, dtype, seed=1)
        scores = _scores(a, b, v)
        cuts = [
            Threshold(float(torch.quantile(s.block(torch.sub(e, w0.float()), slice(None)).flatten()[:10000], 0.6)))
            for s, e in zip(scores, experts)
        ]
        masks = [(scores[0], cuts[0]), None, (scores[2], cuts[2])]  # expert 1: FFG keeps it whole
        for curvs in (
            [
                Curvature.rank1(a, b, power, normalise),
                Curvature.full(v, power, normalise),
                Curvature.rank1(a.flip(0), b.flip(0), power, normalise),
            ],
            [Curvature()] * 3,  # uniform (an expert without moments)
        ):
            coefs = [1.0, 2.0, 0.5]
            got, kept, finite = ops.ota_merge(
                w0,
                experts,
                [mk[0] if mk else None for mk in masks],
                [mk[1].value if mk else 0.0 for mk in masks],
                curvs,
                coefs,
                epsilon=1e-26,
                out_dtype=out_dtype,
            )
            want, want_kept = _torch_merge(w0, experts, masks, curvs, coefs, 1e-26, out_dtype)
            assert finite
            assert kept == want_kept
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_merge_pass_that_adds_up_the_share_rules_masses_writes_the_same_bytes(dtype, threads, monkeypatch):
    """How a shipped histogram is proved under the saliency-share rule: the merge kernel adds up
    each masked expert's masses above, in and below the threshold's bin as it merges (what
    Histogram.share_masses gives of the histogram pass's counts, to float64 rounding), and the
    merged bytes and kept counts do not change."""
    from ota_trainer.backends.thresholds import Histogram, bin_edge

    monkeypatch.setattr(native, "MIN_PARALLEL", 1 << 10)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w0, experts, a, b, v = _inputs(97, 531, dtype, seed=2)
        scores = _scores(a, b, v)
        masked = [scores[0], None, scores[2]]  # expert 1: no mask, nothing added up
        want = [SaliencyHistogram() for _ in experts]
        fresh = ops.SaliencyCounter(want)
        fresh.add(w0, experts, masked)
        fresh.flush()
        hists = [Histogram.from_dense(memoryview(h.counts.numpy()), h.total) for h in want]
        cuts, share_cuts = [0.0] * 3, [None] * 3
        for t in (0, 2):
            th, _ = hists[t].share_threshold(0.9)
            cuts[t], share_cuts[t] = th.value, (bin_edge(th.bin), bin_edge(th.bin + 1))
        curvs = [Curvature.rank1(a, b, 0.5, "none"), Curvature.full(v, 0.5, "none"), Curvature()]
        plain = ops.ota_merge(w0, experts, masked, cuts, curvs, [1.0, 2.0, 0.5], epsilon=1e-26, out_dtype=dtype)
        masses = [[0.0] * 3 for _ in experts]
        got = ops.ota_merge(
            w0,
            experts,
            masked,
            cuts,
            curvs,
            [1.0, 2.0, 0.5],
            epsilon=1e-26,
            out_dtype=dtype,
            share_cuts=share_cuts,
            masses=masses,
        )
        assert torch.equal(got[0], plain[0]) and got[1:] == plain[1:]
        assert masses[1] == [0.0] * 3
        from fractions import Fraction

        from ota_trainer.backends.thresholds import _gamma, share_proved, share_summation_depth

        depth = share_summation_depth([tuple(w0.shape)], threads)
        assert depth == 64 + 8 * w0.shape[0] * 2 + threads  # (rows of 531 entries: two chunks each)
        for t in (0, 2):
            b = hists[t].share_threshold(0.9)[0].bin
            exact = hists[t].share_masses(b)  # (each rounded once from the exact sum)
            assert all(m > 0 for m in exact)
            for got, want in zip(masses[t], exact):  # within the bound share_proved assumes
                assert abs(Fraction(got) - Fraction(want)) <= (_gamma(depth) + Fraction(1, 1 << 52)) * Fraction(want)
            assert share_proved(0.9, masses[t], depth), t
    finally:
        torch.set_num_threads(old)


def test_ota_merge_reports_non_finite_results():
    w0, experts, a, b, v = _inputs(8, 9, torch.float32)
    experts[2][5, 5] = float("nan")
    _, _, finite = ops.ota_merge(
        w0, experts, [None] * 3, [0.0] * 3, [Curvature()] * 3, [1.0] * 3, epsilon=1e-26, out_dtype=torch.float32
    )
    assert not finite


def test_kernel_arguments_are_checked():
    w0, experts, a, b, v = _inputs(8, 9, torch.float32)
    with pytest.raises(ValueError, match="float64"):
        ops.SaliencyCounter([SaliencyHistogram()]).add(w0, experts[:1], [Score("rank1", a=a, b=b)])
    with pytest.raises(ValueError, match="contiguous"):
        ops.ota_merge(w0, [experts[0].t()], [None], [0.0], [Curvature()], [1.0], epsilon=0.0, out_dtype=torch.float32)


def test_unavailable_native_kernels_fall_back_or_fail_as_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("OTA_TRAINER_NATIVE", "0")
    assert not native.available()
    monkeypatch.setenv("OTA_TRAINER_NATIVE", "1")
    assert native.available()
    # a machine without a compiler: a fresh cache and no CC on PATH
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("OTA_TRAINER_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    try:
        with pytest.raises(native.NativeUnavailable, match="no C compiler"):
            native.available()
        monkeypatch.setenv("OTA_TRAINER_NATIVE", "auto")
        assert not native.available()
    finally:
        monkeypatch.undo()
        native._tried, native._lib, native._why = False, None, None
    assert native.available()


# -- whole merges: native and PyTorch engines write the same bytes ---------------------------------
RECIPES = {
    "density": {"parameters": {"density": 0.3}},
    "threshold": {"parameters": {"threshold": 1e-13}},
    "per_tensor": {"parameters": {"density": 0.5, "per_tensor": True}},
    "magnitude": {"parameters": {"density": 0.4, "score": "magnitude"}},
    "share": {"parameters": {"saliency_share": 0.9}},
    "no_graft": {"parameters": {"graft": False, "power": 1.0, "normalise": "mean"}},
    "weights_fp16_out": {"parameters": {"density": 0.6}, "weights": [2.0, 0.5], "dtype": "float16"},
}


@pytest.mark.parametrize("models", ["tiny_models", "bf16_models"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_native_and_torch_engines_write_the_same_merge(models, name, request, tmp_path, monkeypatch):
    m = request.getfixturevalue(models)
    spec = RECIPES[name]
    experts = [str(m["e1"]), str(m["e2"]), str(m["e3"])]
    recipe = {
        "method": "ota",
        "base_model": str(m["base"]),
        "parameters": spec["parameters"],
        "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, spec.get("weights", [1.0] * 3))],
    }
    if "dtype" in spec:
        recipe["dtype"] = spec["dtype"]
    if models == "bf16_models":
        recipe["options"] = {"allow_missing_moments": True}  # e3 has none: uniform curvature, FFG keeps it whole
    outs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("OTA_TRAINER_NATIVE", mode)
        outs[mode] = tmp_path / f"native{mode}"
        merge(recipe, outs[mode], quiet=True)
    a, b = load_file(str(outs["1"] / "model.safetensors")), load_file(str(outs["0"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((outs[k] / REPORT_FILE).read_text()) for k in ("1", "0"))
    assert ra["experts"] == rb["experts"] and ra["tensor_density"] == rb["tensor_density"]
    if spec["parameters"].get("graft", True):
        assert any(e["density"] < 1.0 for e in ra["experts"]), "FFG should have reverted some edits"
    assert all(math.isfinite(x) for v in ra["tensor_density"].values() for x in v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_ties_cuts_and_merge_are_bit_identical_to_the_torch_path(dtype, threads, monkeypatch):
    from ota_trainer.backends.torch.ops import magnitude_cut
    from ota_trainer.merger.methods.ties import ties_merge

    monkeypatch.setattr(native, "MIN_PARALLEL", 1 << 10)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w0, experts, *_ = _inputs(203, 301, dtype, seed=2)
        experts[2][:50] = w0[:50]  # many zero edits: ties at the cut
        experts[0][7, 7] = (w0[7, 7].float() + 1.0).to(dtype)  # one large edit
        deltas = [torch.sub(e, w0.float()) for e in experts]
        for densities in ([0.4, 0.2, 0.9], [1.0, 1e-9, 0.5], [0.5, 0.5, 0.5]):
            cuts = ops.magnitude_cuts(w0, experts, densities)
            assert cuts == [magnitude_cut(d, p) for d, p in zip(deltas, densities)]
            for coefs, lam in (([1.0, 1.0, 1.0], 1.0), ([2.0, 0.5, 1.0], 0.7)):
                got, finite = ops.ties_merge(w0, experts, cuts, coefs, lam, out_dtype=dtype)
                want = ties_merge(w0.float(), deltas, coefs, densities, lam, cuts=cuts).to(dtype)
                assert finite and torch.equal(got, want), (densities, coefs)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("models", ["tiny_models", "bf16_models"])
def test_native_and_torch_ties_write_the_same_merge(models, request, tmp_path, monkeypatch):
    m = request.getfixturevalue(models)
    recipe = {
        "method": "ties",
        "base_model": str(m["base"]),
        "parameters": {"density": 0.3, "lambda": 0.9},
        "models": [
            {"model": str(m[e]), "parameters": {"weight": w}} for e, w in (("e1", 1.0), ("e2", 2.0), ("e3", 0.5))
        ],
    }
    for mode in ("1", "0"):
        monkeypatch.setenv("OTA_TRAINER_NATIVE", mode)
        merge(recipe, tmp_path / mode, quiet=True)
    a, b = load_file(str(tmp_path / "1" / "model.safetensors")), load_file(str(tmp_path / "0" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["sampled", "sample_misleads", "no_bracket"])
def test_ties_cuts_of_large_tensors_are_exact_whichever_way_they_are_found(dtype, case, monkeypatch):
    """Tensors of >= BRACKET_MIN entries: one pass over the bracket a sample found, or (when the
    sample misleads, or too much falls in the bracket) the two full passes; the cut is exact."""
    from ota_trainer.backends.torch.ops import magnitude_cut

    g = torch.Generator().manual_seed(7)
    m, n = 700, 1000  # 700k entries > BRACKET_MIN
    w0 = (torch.randn(m, n, generator=g) * 0.02).to(dtype)
    experts = [(w0.float() + torch.randn(m, n, generator=g) * 2e-3).to(dtype) for _ in range(2)]
    if case == "sample_misleads":  # the sampled entries carry the largest edits: the bracket misses
        flat, base = experts[0].reshape(-1), w0.reshape(-1)
        for j in range(8):  # each sample point is 8 neighbours
            flat[j :: native.BRACKET_STRIDE] = (base[j :: native.BRACKET_STRIDE].float() + 0.5).to(dtype)
    if case == "no_bracket":
        monkeypatch.setattr(native, "BRACKET_MAX_SHARE", 0.0)
    densities = [0.4, 0.05]
    got = ops.magnitude_cuts(w0, experts, densities)
    want = [magnitude_cut(torch.sub(e, w0.float()), p) for e, p in zip(experts, densities)]
    assert got == want


# -- other instruction sets: OTA_TRAINER_MARCH builds the kernels for another target, same bits ---
# Kernel-level digests (histograms, TIES cuts through the sampled bracket, TIES and OTA merges of a
# tensor large enough for every vector path), run here on the native build and in a fresh
# interpreter on the other one.
_DIGEST = """
import hashlib
import torch
from ota_trainer.backends import native
from ota_trainer.backends.native import ops
from ota_trainer.backends.torch.ffg import SaliencyHistogram, Score
from ota_trainer.backends.torch.ops import Curvature


def digest():
    g = torch.Generator().manual_seed(11)
    m, n = 700, 1000  # > BRACKET_MIN entries: the TIES cut is found through the sampled bracket
    w0 = (torch.randn(m, n, generator=g) * 0.02).to(torch.bfloat16)
    ex = [(w0.float() + torch.randn(m, n, generator=g) * 2e-3).to(torch.bfloat16) for _ in range(2)]
    ex[1][:3] = w0[:3]  # zero edits
    a = torch.exp(torch.randn(m, generator=g) * 2 - 10)
    b = torch.exp(torch.randn(n, generator=g) * 2 - 10)
    h = hashlib.sha256()
    hists = [SaliencyHistogram() for _ in ex]
    counter = ops.SaliencyCounter(hists)
    counter.add(w0, ex, [Score.rank1(a, b), Score("magnitude")])
    counter.flush()
    for x in hists:
        h.update(x.counts.numpy().tobytes())
    cuts = ops.magnitude_cuts(w0, ex, [0.4, 0.1])
    h.update(repr(cuts).encode())
    out, finite = ops.ties_merge(w0, ex, cuts, [1.0, 0.5], 0.9, out_dtype=torch.bfloat16)
    h.update(out.view(torch.int16).numpy().tobytes() + repr(finite).encode())
    for curv in ([Curvature.rank1(a, b, 0.5, "none"), Curvature()], [Curvature.rank1(a, b, 1.0, "mean")] * 2):
        got, kept, finite = ops.ota_merge(w0, ex, [Score.rank1(a, b), Score("magnitude")], [1e-14, 1e-6], curv,
                                             [1.0, 2.0], epsilon=1e-26, out_dtype=torch.bfloat16)
        h.update(got.view(torch.int16).numpy().tobytes() + repr((kept, finite)).encode())
    masses = [[0.0] * 3 for _ in ex]  # the merge pass adding up the share rule's masses (its proof)
    ops.ota_merge(w0, ex, [Score.rank1(a, b), Score("magnitude")], [1e-14, 1e-6], [Curvature()] * 2, [1.0, 2.0],
                  epsilon=1e-26, out_dtype=torch.bfloat16, share_cuts=[(1e-15, 1e-14), (1e-7, 1e-6)], masses=masses)
    h.update(repr(masses).encode())
    return h.hexdigest()
"""

_MARCH_PROBE = """
import json, sys
from ota_trainer import merge
from ota_trainer.backends import native
from ota_trainer.backends.native import ops
assert native.available(), native.why_unavailable()
for recipe, out in json.loads(sys.argv[1]):
    merge(recipe, out, quiet=True)
ns = {}
exec(sys.argv[2], ns)
print(json.dumps({"flags": list(native._target_flags()), "digest": ns["digest"](),
                  "libs": sorted(p.name for p in native._cache_dir().glob("ota_kernels-*.so"))}))
"""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_other_instruction_sets_give_the_same_bits(march, tiny_models, bf16_models, tmp_path, monkeypatch):
    """OTA_TRAINER_MARCH=x86-64-v3 (AVX2, no AVX-512) and x86-64 (the baseline) build libraries of
    their own (their own cache key) whose merges are byte-identical to the native build's."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 targets")
    # x86-64-v3: AVX2, FMA, BMI1/2, F16C, MOVBE, LZCNT (abm)
    if march == "x86-64-v3" and not {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"} <= _cpu_flags():
        pytest.skip("this CPU cannot run an x86-64-v3 (AVX2) build")
    jobs = []
    for models, method, params, extra in (
        (bf16_models, "ota", {"density": 0.3}, {"options": {"allow_missing_moments": True}}),
        (tiny_models, "ota", {"density": 0.5, "per_tensor": True}, {}),
        (bf16_models, "ties", {"density": 0.3, "lambda": 0.9}, {}),
    ):
        recipe = {
            "method": method,
            "base_model": str(models["base"]),
            "parameters": params,
            **extra,
            "models": [
                {"model": str(models[e]), "parameters": {"weight": w}}
                for e, w in (("e1", 1.0), ("e2", 2.0), ("e3", 0.5))
            ],
        }
        jobs.append((recipe, str(tmp_path / f"{len(jobs)}-native"), str(tmp_path / f"{len(jobs)}-{march}")))
    monkeypatch.setenv("OTA_TRAINER_NATIVE", "1")
    for recipe, out, _ in jobs:  # this process's build: native (unless OTA_TRAINER_MARCH says otherwise)
        merge(recipe, out, quiet=True)
    ns: dict = {}
    exec(_DIGEST, ns)
    want = ns["digest"]()
    env = {
        **os.environ,
        "OTA_TRAINER_MARCH": march,
        "OTA_TRAINER_CACHE": str(tmp_path / "cache"),
        "OTA_TRAINER_NATIVE": "1",
    }
    r = subprocess.run(
        [sys.executable, "-c", _MARCH_PROBE, json.dumps([(rc, o) for rc, _, o in jobs]), _DIGEST],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["flags"][0] == f"-march={march}" and len(got["libs"]) == 1, got  # built for it, in its own cache
    assert got["digest"] == want
    for _, mine, theirs in jobs:
        files = sorted(p.name for p in Path(mine).glob("*.safetensors"))
        assert files and files == sorted(p.name for p in Path(theirs).glob("*.safetensors"))
        for name in files:
            assert (Path(mine) / name).read_bytes() == (Path(theirs) / name).read_bytes(), (march, mine, name)


def test_a_target_name_is_checked(monkeypatch):
    monkeypatch.setenv("OTA_TRAINER_MARCH", "x86-64 -fplugin=evil.so")
    with pytest.raises(OSError, match="OTA_TRAINER_MARCH"):
        native._target_flags()
    monkeypatch.setenv("OTA_TRAINER_MARCH", "x86-64-v3")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    assert native._target_flags() == ("-march=x86-64-v3", "-mprefer-vector-width=512")  # 512 where the target has it
    monkeypatch.setattr(native.platform, "machine", lambda: "ppc64le")
    assert native._target_flags() == ("-march=x86-64-v3",)  # the width flag is x86's alone
    monkeypatch.setenv("OTA_TRAINER_MARCH", "native")
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native._target_flags() == ("-mcpu=native",)  # gcc on Arm does not take -march=native everywhere


def test_meanwhile_work_runs_while_the_kernels_run_and_never_outlives_them():
    """The calling thread's work (the next tensor's moments) runs once, between handing the calls to
    the pool and collecting them; its error surfaces only after every call has finished."""
    import threading

    started, release = threading.Barrier(3, timeout=10), threading.Event()
    done, seen = [], []

    def call(k):
        started.wait()  # both calls run at once, and the work below runs beside them
        assert release.wait(10)
        done.append(k)
        return k

    def work():
        started.wait()
        seen.append(len(done))
        release.set()
        raise ValueError("bad moments of the next tensor")

    with pytest.raises(ValueError, match="next tensor"):
        with native.meanwhile(work):
            native.run([lambda: call(0), lambda: call(1)], 2)
    assert seen == [0] and sorted(done) == [0, 1]  # ran beside the calls; raised after both finished

    ran = []
    with native.meanwhile(lambda: ran.append("end")):
        assert native.run([lambda: 7], 2) == [7]  # one call runs inline: the work waits for the block's end
        assert ran == []
    assert ran == ["end"]
    with native.meanwhile(lambda: ran.append("once")):
        native.run([lambda: 1, lambda: 2], 2)
        native.run([lambda: 1, lambda: 2], 2)
    assert ran == ["end", "once"]


def test_meanwhile_work_is_dropped_when_the_block_fails():
    """The block's own error is what the caller sees: work not yet done is not run after it."""
    ran = []
    with pytest.raises(KeyError):
        with native.meanwhile(lambda: ran.append("work")):
            raise KeyError("the kernel's error")
    assert ran == []
    with native.meanwhile(lambda: ran.append("next")):
        pass
    assert ran == ["next"]  # (and nothing is left over from the failed block)
