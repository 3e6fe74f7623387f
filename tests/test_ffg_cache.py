"""FFG's histograms are cached between merges of the same inputs: the same bytes as a fresh count,
on every backend; a changed input, a damaged file or a cached histogram that lies is recounted."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backends import _same

from ota_trainer import merge
from ota_trainer.backends.thresholds import N_BINS, Histogram
from ota_trainer.merger import ffg_cache
from ota_trainer.testing.tiny import make_tiny_base, make_tiny_expert

FROM_CACHE = "FFG histogram from the cache"


def two_experts(root) -> dict:
    """A bf16 base and two experts of it, one with rank-one moments, one with full ones."""
    base = make_tiny_base(root / "base", seed=0, dtype=torch.bfloat16, hidden=96)
    return {
        "base": base,
        "e1": make_tiny_expert(base, root / "e1", seed=1, moments="rank1"),
        "e2": make_tiny_expert(base, root / "e2", seed=2, moments="full"),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """:func:`two_experts`, older than the racy window."""
    m = two_experts(tmp_path_factory.mktemp("ffgcache"))
    time.sleep(ffg_cache.RACY_S + 0.1)  # files written this instant are "racy": never cached
    return m


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache on, in a folder of this test's own; returns the histograms' folder."""
    monkeypatch.setenv("OTA_TRAINER_FFG_CACHE", "1")
    monkeypatch.setenv("OTA_TRAINER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ffg"


def _recipe(m, density=0.4, score=None, share=None):
    params = {"density": density, "elect_sign": False}
    if score:
        params["score"] = score
    if share:
        params = {"saliency_share": share, "elect_sign": False}
    return {
        "method": "ota",
        "base_model": str(m["base"]),
        "parameters": params,
        "models": [{"model": str(m[e])} for e in ("e1", "e2")],
    }


def _fresh(recipe, out, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setenv("OTA_TRAINER_FFG_CACHE", "0")
        merge(recipe, out, quiet=True)


def _merge_logged(recipe, out, caplog, **kw):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        merge(recipe, out, quiet=True, **kw)
    return caplog.text


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_a_second_merge_takes_the_histograms_from_the_cache_and_writes_the_same_bytes(
    models, cache, backend, tmp_path, caplog, monkeypatch
):
    if backend == "torch":
        monkeypatch.setenv("OTA_TRAINER_NATIVE", "0")
    kw = {"fast_path": backend == "native"}
    for recipe in (_recipe(models), _recipe(models, score="magnitude")):
        name = recipe["parameters"].get("score", "fisher")
        _fresh(recipe, tmp_path / f"{name}-fresh", monkeypatch)
        first = _merge_logged(recipe, tmp_path / f"{name}-1", caplog, **kw)
        assert FROM_CACHE not in first
        second = _merge_logged(recipe, tmp_path / f"{name}-2", caplog, **kw)
        assert second.count(FROM_CACHE) == 2
        _same(tmp_path / f"{name}-fresh", tmp_path / f"{name}-2")
    assert len(list(cache.glob("*.hist"))) == 4  # fisher and magnitude, per expert
    # another density or the saliency-share rule: the same histograms, merged as a fresh count would
    for i, recipe in enumerate((_recipe(models, density=0.1), _recipe(models, share=0.5))):
        _fresh(recipe, tmp_path / f"other{i}-fresh", monkeypatch)
        assert _merge_logged(recipe, tmp_path / f"other{i}", caplog, **kw).count(FROM_CACHE) == 2
        _same(tmp_path / f"other{i}-fresh", tmp_path / f"other{i}")
    assert len(list(cache.glob("*.hist"))) == 4


def test_the_cli_without_pytorch_uses_the_cache_too(models, cache, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from ota_trainer.merger import as_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(as_recipe(_recipe(models)).to_yaml())
    code = (
        "import sys; from ota_trainer.cli.merge import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'PyTorch was loaded'; sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    logs = []
    for out in ("a", "b"):
        r = subprocess.run(
            [sys.executable, "-c", code, "--recipe", str(path), "--out", str(tmp_path / out)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        logs.append(r.stderr)
    assert FROM_CACHE not in logs[0] and logs[1].count(FROM_CACHE) == 2
    _same(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "ota_merge_report.json").read_text())["method"] == "ota"


def test_a_changed_input_is_counted_again(models, cache, tmp_path, caplog):
    recipe = _recipe(models)
    merge(recipe, tmp_path / "a", quiet=True)
    moments = models["e2"] / "ota" / "moments.safetensors"
    moments.write_bytes(moments.read_bytes())  # the same bytes, written again: a new change time
    only_e1 = f"{models['e1']}: {FROM_CACHE}"
    text = _merge_logged(recipe, tmp_path / "b", caplog)  # e2 changed just now: counted, not cached (racy)
    assert text.count(FROM_CACHE) == 1 and only_e1 in text
    assert len(list(cache.glob("*.hist"))) == 2
    time.sleep(ffg_cache.RACY_S + 0.1)
    text = _merge_logged(recipe, tmp_path / "c", caplog)  # its new key: counted, and cached
    assert text.count(FROM_CACHE) == 1 and only_e1 in text
    assert len(list(cache.glob("*.hist"))) == 3
    assert _merge_logged(recipe, tmp_path / "d", caplog).count(FROM_CACHE) == 2


def test_a_cached_histogram_that_lies_is_caught_by_the_kept_counts_and_recounted(
    models, cache, tmp_path, caplog, monkeypatch
):
    recipe = _recipe(models)
    _fresh(recipe, tmp_path / "fresh", monkeypatch)
    merge(recipe, tmp_path / "a", quiet=True)
    files = sorted(cache.glob("*.hist"))
    assert len(files) == 2
    for f in files:  # valid files, wrong numbers: every entry moved to the median bin
        true = ffg_cache.decode(f.read_bytes(), str(f))
        f.write_bytes(ffg_cache.encode(Histogram([true.bins[len(true.bins) // 2]], [true.total], true.total)))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        merge(recipe, tmp_path / "b", quiet=True)
    assert "the cached FFG histogram predicted" in caplog.text and "merging again from a fresh count" in caplog.text
    _same(tmp_path / "fresh", tmp_path / "b")
    for f in files:  # replaced by the true counts
        assert len(ffg_cache.decode(f.read_bytes(), str(f)).bins) > 1
    assert _merge_logged(recipe, tmp_path / "c", caplog).count(FROM_CACHE) == 2
    assert "predicted" not in caplog.text


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-5],  # truncated
        lambda b: b"garbage" + b[7:],  # another magic
        lambda b: b[:24] + b[28:32] + b[24:28] + b[32:],  # the first two bins swapped
        lambda b: b[:-8] + (2**40).to_bytes(8, "little"),  # counts that do not add up
        lambda b: b"",
    ],
)
def test_a_damaged_cache_file_is_ignored_with_a_warning(models, cache, damage, tmp_path, caplog, monkeypatch):
    recipe = _recipe(models)
    _fresh(recipe, tmp_path / "fresh", monkeypatch)
    merge(recipe, tmp_path / "a", quiet=True)
    f = sorted(cache.glob("*.hist"))[0]
    f.write_bytes(damage(f.read_bytes()))
    text = _merge_logged(recipe, tmp_path / "b", caplog)
    assert "ignoring a damaged cached FFG histogram" in text and str(f) in text
    assert text.count(FROM_CACHE) == 1
    _same(tmp_path / "fresh", tmp_path / "b")
    ffg_cache.decode(f.read_bytes(), str(f))  # counted again and cached whole


def test_a_cache_others_can_write_to_is_not_used(models, cache, tmp_path, caplog):
    recipe = _recipe(models)
    merge(recipe, tmp_path / "a", quiet=True)
    os.chmod(cache, 0o777)
    try:
        text = _merge_logged(recipe, tmp_path / "b", caplog)
    finally:
        os.chmod(cache, 0o700)
    assert FROM_CACHE not in text and "other users can write" in text
    assert text.count("refusing the FFG histogram cache") == 1  # once, not per expert and call


def test_off_switch(models, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("OTA_TRAINER_FFG_CACHE", "0")
    merge(_recipe(models), tmp_path / "a", quiet=True)
    assert not cache.exists()


def test_the_least_recently_used_histograms_are_evicted(cache, monkeypatch):
    monkeypatch.setattr(ffg_cache, "KEEP", 3)
    hist = Histogram([1, 5], [2, 3], 5)
    for k in "abcd":
        ffg_cache.store(k * 32, hist)
        os.utime(cache / f"{k * 32}.hist", (1000 + ord(k), 1000 + ord(k)))  # written in this order
    assert ffg_cache.load("a" * 32) is None  # the oldest went when the fourth came
    assert ffg_cache.load("b" * 32) == hist  # used now: no longer the oldest
    ffg_cache.store("e" * 32, hist)
    assert sorted(p.stem[0] for p in cache.glob("*.hist")) == ["b", "d", "e"]


@settings(max_examples=300, deadline=None)
@given(
    hist=st.lists(st.tuples(st.integers(0, N_BINS - 1), st.integers(1, 2**40)), min_size=0, max_size=40),
    cut=st.integers(0, 80),
    flip=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
)
def test_any_cache_file_bytes_decode_to_a_consistent_histogram_or_a_clear_error(hist, cut, flip):
    """The decoder is the only judge of a cache file: every byte string either decodes to a
    histogram whose bins are ordered and whose counts add up, or raises ValueError naming it."""
    bins = sorted(dict(hist))
    counts = [dict(hist)[b] for b in bins]
    data = bytearray(ffg_cache.encode(Histogram(bins, counts, sum(counts))))
    assert ffg_cache.decode(bytes(data), "f") == Histogram(bins, counts, sum(counts))
    for pos, byte in flip:
        if data:
            data[pos % len(data)] = byte
    data = data[: len(data) - cut] if cut else data
    try:
        got = ffg_cache.decode(bytes(data), "cache/f.hist")
    except ValueError as e:
        assert "cache/f.hist" in str(e)
    else:
        assert all(a < b for a, b in zip(got.bins, got.bins[1:])) and all(b < N_BINS for b in got.bins)
        assert all(c > 0 for c in got.counts) and sum(got.counts) == got.total
