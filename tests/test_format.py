import glob
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from ota_trainer import FormatError, NumericalError, load_moments, save_moments
from ota_trainer.moments.format import FORMAT_VERSION, METADATA_KEY, moments_path


def _moments():
    g = torch.Generator().manual_seed(0)
    return {
        "w2d": torch.rand(6, 4, generator=g),
        "w3d": torch.rand(3, 2, 5, generator=g),
        "bias": torch.rand(4, generator=g),
        "zeros": torch.zeros(2, 3),
    }


@pytest.mark.parametrize("compression", ["rank1", "full"])
def test_round_trip(tmp_path, compression):
    m = _moments()
    path = save_moments(
        tmp_path,
        m,
        compression=compression,
        metadata={"step": 7, "beta2": 0.99, "optimizer": "adamw_torch", "base_model": "org/base"},
    )
    assert path == tmp_path / "ota" / "moments.safetensors"
    loaded = load_moments(tmp_path)
    assert set(loaded) == set(m) and len(loaded) == 4
    meta = loaded.metadata
    assert meta["format_version"] == FORMAT_VERSION and meta["compression"] == compression
    assert meta["step"] == 7 and meta["beta2"] == 0.99 and meta["base_model"] == "org/base"
    assert meta["parameters"]["w3d"] == {"shape": [3, 2, 5], "stored": "full" if compression == "full" else "rank1"}
    assert meta["parameters"]["bias"]["stored"] == "full"  # 1-D always whole
    for name, v in m.items():
        got = loaded[name]
        assert got.shape == v.shape and got.dtype == torch.float32
        if compression == "full" or v.dim() == 1:
            assert torch.equal(got, v)
        else:
            mat = v.reshape(v.shape[0], -1)
            r, c = mat.sum(1), mat.sum(0)
            expected = torch.outer(r, c) / r.sum() if r.sum() > 0 else torch.zeros_like(mat)
            assert_close(got.reshape(mat.shape), expected)


def test_rank1_file_stores_only_row_and_column_sums(tmp_path):
    save_moments(tmp_path, {"w": torch.rand(100, 50)})
    from safetensors import safe_open

    with safe_open(str(moments_path(tmp_path)), "pt") as f:
        assert sorted(f.keys()) == ["w::col", "w::row"]
        assert f.get_tensor("w::row").shape == (100,) and f.get_tensor("w::col").shape == (50,)


def test_bias_correction(tmp_path):
    v = torch.rand(3, 3)
    save_moments(tmp_path, {"w": v}, compression="full", metadata={"step": 10, "beta2": 0.9})
    assert_close(load_moments(tmp_path, bias_correction=True)["w"], v / (1 - 0.9**10))
    assert torch.equal(load_moments(tmp_path)["w"], v)


def test_reads_are_lazy_and_do_not_alter_the_file(tmp_path):
    save_moments(tmp_path, {"w": torch.ones(2, 2)}, compression="full", metadata={"step": 1, "beta2": 0.5})
    m = load_moments(tmp_path, bias_correction=True)
    assert_close(m["w"], torch.full((2, 2), 2.0))
    assert_close(m["w"], torch.full((2, 2), 2.0))  # the in-place scaling must not leak into the mapping
    with pytest.raises(KeyError):
        m["nope"]


def test_reader_closes_its_file_on_leaving_a_with_block(tmp_path):
    save_moments(tmp_path, {"w": torch.ones(2, 2)}, compression="rank1")
    with load_moments(tmp_path) as m:
        assert_close(m["w"], torch.ones(2, 2))
    assert "w" in m and m.shapes["w"] == (2, 2)  # the header stays readable
    with pytest.raises(ValueError, match="closed file"):
        m["w"]


def test_moments_are_invisible_to_weight_globbing_and_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from ota_trainer.testing.tiny import make_tiny_base

    folder = make_tiny_base(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    save_moments(folder, {n: torch.rand_like(p) for n, p in model.named_parameters()})
    # vLLM / mergekit style: top-level *.safetensors are the weights
    assert [os.path.basename(p) for p in glob.glob(str(folder / "*.safetensors"))] == ["model.safetensors"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FormatError, match="OTACallback"):
        load_moments(tmp_path)


def test_truncated_file(tmp_path):
    save_moments(tmp_path, {"w": torch.rand(64, 64)}, compression="full")
    p = moments_path(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="truncated") as e:
        load_moments(tmp_path)
    assert str(p) in str(e.value)


def test_garbage_file(tmp_path):
    p = moments_path(tmp_path)
    p.parent.mkdir()
    p.write_bytes(b"\xff" * 64)
    with pytest.raises(FormatError, match="moments.safetensors"):
        load_moments(tmp_path)


def test_plain_safetensors_without_metadata_is_rejected(tmp_path):
    p = moments_path(tmp_path)
    p.parent.mkdir()
    save_file({"w": torch.rand(2, 2)}, str(p))
    with pytest.raises(FormatError, match="not an ota_trainer moments file"):
        load_moments(tmp_path)


def test_future_format_version_is_rejected(tmp_path):
    p = moments_path(tmp_path)
    p.parent.mkdir()
    meta = {
        "format": "ota-moments",
        "format_version": 99,
        "compression": "full",
        "step": 1,
        "beta2": 0.9,
        "parameters": {},
    }
    save_file({"w": torch.rand(2)}, str(p), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(FormatError, match="version 99"):
        load_moments(tmp_path)


def test_metadata_shape_mismatch_is_rejected(tmp_path):
    p = moments_path(tmp_path)
    p.parent.mkdir()
    meta = {
        "format": "ota-moments",
        "format_version": 1,
        "compression": "full",
        "step": 1,
        "beta2": 0.9,
        "parameters": {"w": {"shape": [3], "stored": "full"}},
    }
    save_file({"w": torch.rand(2)}, str(p), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(FormatError, match="'w' has shape"):
        load_moments(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_values_are_refused_on_save(tmp_path, bad):
    v = torch.rand(3, 3)
    v[1, 1] = bad
    with pytest.raises(NumericalError, match="'w'"):
        save_moments(tmp_path, {"w": v})
    assert not moments_path(tmp_path).exists()


def test_negative_values_in_a_file_are_refused_on_read(tmp_path):
    p = moments_path(tmp_path)
    p.parent.mkdir()
    meta = {
        "format": "ota-moments",
        "format_version": 1,
        "compression": "rank1",
        "step": 1,
        "beta2": 0.9,
        "parameters": {"w": {"shape": [2, 2], "stored": "rank1"}},
    }
    save_file(
        {"w::row": torch.tensor([1.0, -1.0]), "w::col": torch.tensor([1.0, 1.0])},
        str(p),
        metadata={METADATA_KEY: json.dumps(meta)},
    )
    with pytest.raises(NumericalError, match="negative"):
        load_moments(tmp_path)["w"]


def test_rank1_factors_are_stored_exactly_and_convert_round_trips(tmp_path):
    from ota_trainer.moments.format import Rank1Factors, convert_moments

    r, c = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, 4.0, 1.0])  # both sum to sum(v) = 6
    save_moments(
        tmp_path / "a", {"w": Rank1Factors(r, c, (3, 2, 2)), "b": torch.ones(3)}, metadata={"step": 3, "beta2": 0.9}
    )
    m = load_moments(tmp_path / "a")
    raw = m.raw("w")
    assert torch.equal(raw.row, r) and torch.equal(raw.col, c) and raw.shape == (3, 2, 2)
    assert_close(m["w"], (torch.outer(r, c) / r.sum()).reshape(3, 2, 2))
    convert_moments(tmp_path / "a", tmp_path / "full", compression="full")
    full = load_moments(tmp_path / "full")
    assert full.metadata["compression"] == "full" and full.metadata["step"] == 3
    assert_close(full["w"], m["w"])
    convert_moments(tmp_path / "full", tmp_path / "back", compression="rank1")
    assert_close(load_moments(tmp_path / "back").raw("w").row, r)
    with pytest.raises(FormatError, match="do not fit"):
        save_moments(tmp_path / "bad", {"w": Rank1Factors(r, c, (4, 4))})
    with pytest.raises(FormatError, match="disagree"):
        save_moments(tmp_path / "bad", {"w": Rank1Factors(r, c * 2, (3, 4))})


def test_rank1_bias_correction_and_log2(tmp_path):
    v = torch.rand(5, 4) + 0.1
    save_moments(tmp_path, {"w": v, "z": torch.zeros(2, 3)}, metadata={"step": 10, "beta2": 0.9})
    plain, corrected = load_moments(tmp_path), load_moments(tmp_path, bias_correction=True)
    assert_close(corrected["w"], plain["w"] / (1 - 0.9**10))
    assert_close(corrected.log2("w"), torch.log2(corrected["w"]))
    assert torch.equal(corrected.log2("z"), torch.full((2, 3), float("-inf")))


def test_rank1_factors_reproduce_the_reconstruction(tmp_path):
    v = torch.rand(6, 2, 3) + 0.1  # > 2-D: factored as (6, 6)
    save_moments(tmp_path, {"w": v, "z": torch.zeros(2, 3), "b": torch.rand(4)}, metadata={"step": 10, "beta2": 0.9})
    m = load_moments(tmp_path, bias_correction=True)
    a, b = m.rank1("w")
    assert a.shape == (6,) and b.shape == (6,)
    assert_close(torch.outer(a, b).reshape(6, 2, 3), m["w"])
    za, zb = m.rank1("z")
    assert torch.equal(torch.outer(za, zb), torch.zeros(2, 3))
    assert m.rank1("b") is None  # 1-D entries are stored whole
