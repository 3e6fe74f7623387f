"""An expert's shipped FFG histogram (ota/ffg_histogram.safetensors): a first merge that uses it
writes the bytes a fresh count gives; the merge pass proves the threshold it gives (the counts at
its neighbouring bin edges, or, under the saliency-share rule, the masses above, in and below its
bin): a histogram that lies is caught, and the merge redone; a damaged, hostile or inapplicable
file is ignored; the proofs themselves (Histogram.checks, share_proved) against the threshold
rules on random histograms."""

from __future__ import annotations

import logging
import os
import shutil
from array import array

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backends import _same
from test_ffg_cache import two_experts

from ota_trainer import merge, save_ffg_histogram
from ota_trainer.backends.thresholds import Histogram, bin_edge, share_proved
from ota_trainer.io.layout import read_safetensors_layout
from ota_trainer.merger.ffg_shipped import open_shipped, write_histogram
from ota_trainer.merger.inputs import open_model

SHIPPED = "FFG histogram shipped with the expert"
REDONE = "merging again from a fresh count"


# -- the proof, against the rule -----------------------------------------------------------------------
def _kept(h: Histogram, b: int) -> int:
    return sum(c for x, c in zip(h.bins, h.counts) if x >= b)


def _dense(draw_counts: list[int]) -> Histogram:
    bins = [b for b, c in enumerate(draw_counts) if c]
    return Histogram(bins, [draw_counts[b] for b in bins], sum(draw_counts))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=4, max_size=40),
    st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39)), max_size=6),
    st.floats(0.02, 0.98),
)
def test_three_counts_prove_a_threshold_taken_from_another_histogram(counts, moves, density):
    """Whenever the counts at b - 1, b and b + 1 agree, the rule picks the same bin on both."""
    if sum(counts) == 0:
        return
    claimed = _dense(counts)
    true = list(counts)
    for src, dst in moves:  # the truth: some entries in other bins than the claim says
        src, dst = src % len(true), dst % len(true)
        if true[src]:
            true[src] -= 1
            true[dst] += 1
    truth = _dense(true)
    threshold, kept = claimed.density_threshold(density)
    proof = claimed.checks(threshold)
    if proof is None:
        return
    b = threshold.bin
    lo, hi, k_lo, k_hi = proof
    assert (lo, hi) == (bin_edge(b - 1), bin_edge(b + 1))
    assert (k_lo, kept, k_hi) == (_kept(claimed, b - 1), _kept(claimed, b), _kept(claimed, b + 1))
    if (_kept(truth, b - 1), _kept(truth, b), _kept(truth, b + 1)) == (k_lo, kept, k_hi):
        assert truth.density_threshold(density)[0] == threshold


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.integers(0, 9), min_size=4, max_size=60),
    st.lists(st.tuples(st.integers(0, 59), st.integers(0, 59), st.integers(1, 3)), max_size=6),
    st.sampled_from([0.5, 0.9, 0.99, 0.999]),
    st.integers(0, 3),
)
def test_masses_that_prove_a_share_threshold_make_the_rule_pick_it(counts, moves, share, octave):
    """Whenever share_proved accepts the masses of the truth (another histogram than the one
    the threshold came from), the share rule picks the same bin on the truth."""
    base = (1000 + 40 * octave) << 10  # bins of a few octaves of saliencies, 1024 bins each
    spread = [base + 37 * k for k in range(len(counts))]
    claimed_counts = dict(zip(spread, counts))
    if not any(counts):
        return
    true = dict(claimed_counts)
    for src, dst, n in moves:
        src, dst = spread[src % len(spread)], spread[dst % len(spread)]
        n = min(n, true[src])
        true[src] -= n
        true[dst] += n

    def hist(d):
        bins = sorted(b for b, c in d.items() if c)
        return Histogram(bins, [d[b] for b in bins], sum(d.values()))

    claimed, truth = hist(claimed_counts), hist(true)
    threshold, _ = claimed.share_threshold(share)
    if threshold.keeps_all:
        return
    masses = truth.share_masses(threshold.bin)
    if share_proved(share, masses, 1):
        assert truth.share_threshold(share)[0] == threshold
    above, at, below = masses
    total = above + at + below
    if truth == claimed and min(above + at - share * total, share * total - above) > 1e-6 * total:
        assert share_proved(share, masses, 1)  # a true claim off the rounding edge: proved


def test_share_proved_refuses_what_it_cannot_show():
    h = Histogram([1024 * 1000, 1024 * 1001], [10, 10], 20)  # the top bin holds 2/3 of the mass
    b = h.share_threshold(0.5)[0].bin
    assert b == 1024 * 1001 and share_proved(0.5, h.share_masses(b), 1)
    above, at, below = h.share_masses(b)
    assert not share_proved(0.5, (above, 0.0, below), 1)  # its bin empty: not a bin the rule picks
    assert not share_proved(0.5, (10 * at, at, below), 1)  # the mass above reaches the target
    exact = at / (at + below)  # the share at which the threshold bin holds exactly the target
    assert not share_proved(exact, (above, at, below), 1)  # no margin for the rounding
    assert not share_proved(0.5, (above, at, below), 1 << 41) and not share_proved(1.0, (above, at, below), 1)


def test_a_threshold_next_to_an_empty_bin_is_not_proved():
    h = Histogram([2, 4, 5], [3, 3, 3], 9)  # bin 3 empty
    assert h.checks(h.density_threshold(0.66)[0]) is None  # b = 4: b - 1 empty
    assert h.checks(h.density_threshold(0.34)[0]) is not None  # b = 5: 4 and 5 non-empty


# -- merges ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The cache tests' base and two experts, shipping their histograms."""
    root = tmp_path_factory.mktemp("ffgshipped")
    m = two_experts(root)
    m["fresh"] = root / "fresh"  # their merge from a fresh count
    merge(_recipe(m), m["fresh"], quiet=True)
    for e in ("e1", "e2"):
        assert save_ffg_histogram(m[e], m["base"]) == m[e] / "ota" / "ffg_histogram.safetensors"
    return m


def _recipe(m, experts=("e1", "e2"), **params):
    return {
        "method": "ota",
        "base_model": str(m["base"]),
        "parameters": {"density": 0.4, **params},
        "models": [{"model": str(m[e])} for e in experts],
    }


def _merge_logged(recipe, out, caplog, **kw):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        merge(recipe, out, quiet=True, **kw)
    return caplog.text


def _same_bytes(a, b):
    """The same merged weights, byte for byte (the reports name other expert folders)."""
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b.glob("*.safetensors"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def _copy_expert(m, tmp_path, name="e1"):
    dst = tmp_path / name
    shutil.copytree(m[name], dst)
    return {**m, name: dst}


def test_a_first_merge_uses_the_shipped_histograms_and_writes_the_bytes_of_a_fresh_count(models, tmp_path, caplog):
    log = _merge_logged(_recipe(models), tmp_path / "out", caplog)
    assert log.count(SHIPPED) == 2 and REDONE not in log
    _same(models["fresh"], tmp_path / "out")


def test_the_shipped_histogram_equals_a_fresh_count(models):
    from ota_trainer.merger import MergeRecipe, open_inputs
    from ota_trainer.merger.report import local_resolver
    from ota_trainer.merger.runner import count_histograms

    for e in ("e1", "e2"):
        recipe = MergeRecipe.from_dict(_recipe(models, experts=(e,)))
        (fresh,) = count_histograms(recipe, open_inputs(recipe, local_resolver), [0])
        assert open_shipped(open_model(models[e])).histogram == fresh


@pytest.mark.parametrize("backend", ["torch", "magnitude"])
def test_a_merge_that_cannot_prove_it_counts_afresh(models, backend, tmp_path, caplog, monkeypatch):
    """The PyTorch backend proves no threshold; another score is another saliency. Each counts
    afresh, with the bytes of a fresh count."""
    kw, recipe = {}, _recipe(models)
    if backend == "torch":
        monkeypatch.setenv("OTA_TRAINER_NATIVE", "0")
        kw["fast_path"] = False
    else:
        recipe = _recipe(models, score="magnitude")
    log = _merge_logged(recipe, tmp_path / "out", caplog, **kw)
    assert SHIPPED not in log and REDONE not in log
    if backend == "magnitude":
        assert "of another saliency (score, scale)" in log
    if backend == "torch":
        _same(models["fresh"], tmp_path / "out")


SHARE = {"saliency_share": 0.9}  # the rule of ota's default (0.99 keeps nearly every edit of these tiny experts)


def _share_recipe(m):
    return {**_recipe(m), "parameters": SHARE}


@pytest.fixture(scope="module")
def fresh_share(models, tmp_path_factory):
    """The experts' merge under the share rule from a fresh count (their histograms not shipped)."""
    root = tmp_path_factory.mktemp("fresh_share")
    m = {**models, **{e: root / e for e in ("e1", "e2")}}
    for e in ("e1", "e2"):
        shutil.copytree(models[e], m[e])
        (m[e] / "ota" / "ffg_histogram.safetensors").unlink()
    merge(_share_recipe(m), root / "out", quiet=True)
    return root / "out"


def test_under_the_share_rule_a_first_merge_proves_the_shipped_histograms_by_their_masses(
    models, fresh_share, tmp_path, caplog
):
    """The share rule's threshold depends on every bin's mass: the merge pass adds up the masses
    above, in and below the threshold's bin, which prove a fresh count would pick it."""
    log = _merge_logged(_share_recipe(models), tmp_path / "out", caplog)
    assert log.count(SHIPPED) == 2 and REDONE not in log
    _same_bytes(fresh_share, tmp_path / "out")


def _lie(m, tmp_path, move, share: float | None = None):
    """Expert e1 copied, its shipped histogram rewritten by ``move(bins, counts, b)`` (b: the
    threshold bin the true histogram gives at density 0.4, or at saliency share ``share``)."""
    m = _copy_expert(m, tmp_path)
    shipped = open_shipped(open_model(m["e1"]))
    h = shipped.histogram
    b = (h.share_threshold(share) if share else h.density_threshold(0.4))[0].bin
    dense = {x: c for x, c in zip(h.bins, h.counts)}
    move(dense, b)
    bins = sorted(x for x, c in dense.items() if c > 0)
    lie = Histogram(bins, [dense[x] for x in bins], h.total)
    meta = read_safetensors_layout(shipped.path)[0]["__metadata__"]
    write_histogram(m["e1"], lie, shipped.describes, {"base_model": meta["base_model"]})
    return m


def _shift(src: int, dst: int, n: int = 1):
    def move(dense, b):
        n_ = min(n, dense.get(b + src, 0))
        dense[b + src] = dense.get(b + src, 0) - n_
        dense[b + dst] = dense.get(b + dst, 0) + n_

    return move


@pytest.mark.parametrize(
    "lie",
    [
        _shift(-1, -2),  # K(b) holds, K(b - 1) does not: caught by the lower check alone
        _shift(0, 1, 1),  # K(b) and K(b - 1) hold, K(b + 1) does not
        _shift(0, -1, 3),  # the kept count itself is off
    ],
    ids=["below", "above", "kept"],
)
def test_a_lying_histogram_is_caught_by_the_merge_pass_and_the_merge_redone(models, lie, tmp_path, caplog):
    m = _lie(models, tmp_path, lie)
    log = _merge_logged(_recipe(m), tmp_path / "out", caplog)
    assert "shipped FFG histogram predicted" in log and REDONE in log
    _same_bytes(models["fresh"], tmp_path / "out")
    assert not list(tmp_path.glob("*.ota-tmp*")) and not list(tmp_path.glob(".out*"))


def _far_below(dense, b):
    """One entry of the lowest non-empty bin moved to the next: the same kept count, and the share
    threshold does not move (such an entry's mass is ~2^-20 of the kept mass)."""
    low = sorted(x for x in dense if 0 < x < b and dense[x] > 0)
    dense[low[0]] -= 1
    dense[low[0] + 1] = dense.get(low[0] + 1, 0) + 1


def _top_heavy(dense, b):
    """Entries of the threshold's bin claimed at the top: more mass above, a higher threshold."""
    top = max(dense)
    n = dense[b]
    dense[b] = 0
    dense[top] += n


@pytest.mark.parametrize("lie, redone", [(_top_heavy, True), (_far_below, False)], ids=["threshold", "harmless"])
def test_under_the_share_rule_a_lie_that_moves_the_threshold_is_caught_and_one_that_does_not_is_harmless(
    models, fresh_share, lie, redone, tmp_path, caplog
):
    m = _lie(models, tmp_path, lie, share=SHARE["saliency_share"])
    h = open_shipped(open_model(m["e1"])).histogram
    truth = open_shipped(open_model(models["e1"])).histogram
    moved = h.share_threshold(0.9)[0] != truth.share_threshold(0.9)[0]
    assert moved == redone and h != truth
    log = _merge_logged(_share_recipe(m), tmp_path / "out", caplog)
    assert (REDONE in log) == redone
    if redone:
        assert "shipped FFG histogram predicted" in log and "which do not prove it" in log
    _same_bytes(fresh_share, tmp_path / "out")
    assert not list(tmp_path.glob("*.ota-tmp*")) and not list(tmp_path.glob(".out*"))


def _damage_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 8])


def _damage_unordered(path):
    header, start = read_safetensors_layout(path)
    data = bytearray(path.read_bytes())
    b0, _ = header["bins"]["data_offsets"]
    bins = array("q", data[start + b0 : start + b0 + 16])
    bins[0], bins[1] = bins[1], bins[0]
    data[start + b0 : start + b0 + 16] = bins.tobytes()
    path.write_bytes(bytes(data))


def _damage_total(path):
    data = path.read_bytes()
    total = read_safetensors_layout(path)[0]["__metadata__"]["total"]
    old, new = f'"total":"{total}"'.encode(), f'"total":"{int(total) + 1}"'.encode()
    assert data.count(old) == 1 and len(new) == len(old)
    path.write_bytes(data.replace(old, new))


def _damage_outside(path):
    outside = path.parents[3] / "elsewhere.safetensors"
    shutil.copy(path, outside)
    path.unlink()
    os.symlink(outside, path)


def _damage_not_ours(path):
    from safetensors.torch import save_file

    save_file({"bins": torch.zeros(3, dtype=torch.int32)}, str(path))


@pytest.mark.parametrize(
    "damage",
    [_damage_truncate, _damage_unordered, _damage_total, _damage_outside, _damage_not_ours],
    ids=["truncated", "unordered", "total", "outside", "not-ours"],
)
def test_a_damaged_or_hostile_histogram_is_ignored_with_a_warning_naming_it(models, damage, tmp_path, caplog):
    m = _copy_expert(models, tmp_path / "in")
    damage(m["e1"] / "ota" / "ffg_histogram.safetensors")
    log = _merge_logged(_recipe(m), tmp_path / "out", caplog)
    assert "ignoring its FFG histogram ota/ffg_histogram.safetensors" in log
    assert str(m["e1"]) in log
    assert log.count(SHIPPED) == 1  # e2's is used
    _same_bytes(models["fresh"], tmp_path / "out")


def test_push_expert_ships_the_histogram_and_a_merge_of_repo_ids_uses_it(local_hub, models, tmp_path, caplog):
    from ota_trainer.hub import merge as hub_merge
    from ota_trainer.hub import publish_folder, push_expert

    publish_folder(models["base"], "org/base")
    push_expert(models["e1"], "org/e1")
    push_expert(models["e2"], "org/e2")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        hub_merge(
            {"method": "ota", "base_model": "org/base", "parameters": {"density": 0.4}, "models": ["org/e1", "org/e2"]},
            tmp_path / "out",
            quiet=True,
        )
    assert caplog.text.count(SHIPPED) == 2 and REDONE not in caplog.text
    _same_bytes(models["fresh"], tmp_path / "out")


# -- shipped by OTACallback at the end of training ---------------------------------------------------
HISTOGRAM = ("ota", "ffg_histogram.safetensors")


@pytest.mark.parametrize("tie", [True, False])
def test_the_callback_ships_the_histogram_a_fresh_count_of_the_saved_expert_gives(tmp_path, tie, caplog):
    """Counted from the weights in memory before save_model(): the bytes save_ffg_histogram
    counts from the saved files, and a first merge uses it."""
    from test_capture import make_trainer
    from transformers import AutoModelForCausalLM

    from ota_trainer import OTACallback
    from ota_trainer.testing.tiny import make_tiny_base

    base = make_tiny_base(tmp_path / "base", tie=tie)
    out = tmp_path / "expert"
    model = AutoModelForCausalLM.from_pretrained(base)  # its config names the base folder
    trainer = make_trainer(out, callback=OTACallback(), model=model, save_strategy="no", max_steps=3)
    trainer.train()
    shipped = out.joinpath(*HISTOGRAM)
    assert shipped.is_file() and not (out / "model.safetensors").exists()
    ours = shipped.read_bytes()
    trainer.save_model()
    save_ffg_histogram(out, base)  # a fresh count of the saved files, over it
    assert shipped.read_bytes() == ours
    recipe = {"method": "ota", "base_model": str(base), "parameters": {"density": 0.4}, "models": [str(out)]}
    log = _merge_logged(recipe, tmp_path / "merged", caplog)
    assert SHIPPED in log and REDONE not in log


def test_a_stale_histogram_goes_at_train_begin_and_none_is_shipped_when_off_or_without_a_local_base(tmp_path, caplog):
    from test_capture import make_trainer
    from transformers import AutoModelForCausalLM

    from ota_trainer import OTACallback
    from ota_trainer.moments.format import has_moments
    from ota_trainer.testing.tiny import make_tiny_base

    base = make_tiny_base(tmp_path / "base")
    out = tmp_path / "expert"
    stale = out.joinpath(*HISTOGRAM)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier run")
    model = AutoModelForCausalLM.from_pretrained(base)
    make_trainer(out, callback=OTACallback(ship_ffg_histogram=False), model=model, save_strategy="no").train()
    assert has_moments(out) and not stale.exists()

    caplog.clear()  # a base named for the merger that is not on this machine, and a model built from a config
    with caplog.at_level(logging.INFO, logger="ota_trainer"):
        make_trainer(out, callback=OTACallback(base_model="nobody/nothing"), save_strategy="no").train()
    assert has_moments(out) and not stale.exists()
    assert "no FFG histogram shipped" in caplog.text and "nobody/nothing" in caplog.text


@pytest.mark.parametrize("expert", ["e1", "e2"])  # rank-one and full moments
def test_a_histogram_of_weights_in_memory_equals_the_count_of_the_same_weights_saved(bf16_models, expert, tmp_path):
    from safetensors.torch import load_file

    from ota_trainer.merger.ffg_shipped import WeightsHeldElsewhere, ship_histogram_of_weights

    src = bf16_models[expert]
    weights = load_file(str(src / "model.safetensors"))  # bf16, as saved
    mem, saved = shutil.copytree(src, tmp_path / "mem"), shutil.copytree(src, tmp_path / "saved")
    ship_histogram_of_weights(mem, bf16_models["base"], weights)
    save_ffg_histogram(saved, bf16_models["base"])
    assert mem.joinpath(*HISTOGRAM).read_bytes() == saved.joinpath(*HISTOGRAM).read_bytes()
    first = next(iter(weights))
    weights[first] = weights[first][:1]
    with pytest.raises(ValueError, match=f"{first}.* entries; the base's has"):
        ship_histogram_of_weights(mem, bf16_models["base"], weights)
    del weights[first]  # held in another layout in memory (e.g. fused MoE experts): the callback says so
    with pytest.raises(WeightsHeldElsewhere, match="not among the weights in memory") as e:
        ship_histogram_of_weights(mem, bf16_models["base"], weights)
    assert e.value.name == first
