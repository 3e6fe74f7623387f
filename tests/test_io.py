"""Input and output paths of the engine: mapped reads, direct-I/O writes, read-ahead."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from pagecache import direct_io_works, resident_share
from safetensors.torch import load_file, save_file

from ota_trainer.errors import FormatError
from ota_trainer.io import readahead, write
from ota_trainer.io.checkpoint import ModelFolder
from ota_trainer.io.write import StreamingSafetensorsWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(1000, 7, generator=g).to(torch.bfloat16),
        "b": torch.randn(3, generator=g),
        "c": torch.arange(5000, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("direct", ["1", "0"])
def test_streaming_writer_output_is_the_same_with_and_without_direct_io(direct, tmp_path, monkeypatch):
    monkeypatch.setenv("OTA_TRAINER_DIRECT_IO", direct)
    monkeypatch.setattr(write, "STAGING_BYTES", 8192)  # tensors cross staging-buffer boundaries
    ts = _tensors()
    plan = [(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    w = StreamingSafetensorsWriter(tmp_path, plan, max_shard_bytes=20_000)
    for n, t in ts.items():
        w.write(n, t)
    files = w.close()
    assert "model.safetensors.index.json" in files
    got = {}
    for f in files[:-1]:
        got.update(load_file(str(tmp_path / f)))
    assert got.keys() == ts.keys()
    for n in ts:
        assert torch.equal(got[n], ts[n]), n


@pytest.mark.parametrize("direct", ["1", "0"])
def test_tensors_produced_in_the_writers_staging_memory_give_the_same_files(direct, tmp_path, monkeypatch):
    monkeypatch.setenv("OTA_TRAINER_DIRECT_IO", direct)
    monkeypatch.setattr(write, "STAGING_BYTES", 16384)  # some tensors fit in the free part, some do not
    ts = _tensors()
    ts["d"] = torch.randn(700, generator=torch.Generator().manual_seed(1))
    ts["e"] = torch.randn(2500, generator=torch.Generator().manual_seed(2))  # 10000 bytes: fits a buffer
    ts["f"] = torch.randn(2000, generator=torch.Generator().manual_seed(3))  # 8000: not in what e leaves free
    plan = [(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    w = StreamingSafetensorsWriter(tmp_path / "copied", plan, max_shard_bytes=20_000)
    (tmp_path / "copied").mkdir()
    for n, t in ts.items():
        w.write(n, t)
    want = w.close()
    (tmp_path / "in_place").mkdir()
    w = StreamingSafetensorsWriter(tmp_path / "in_place", plan, max_shard_bytes=20_000)
    in_place, early_flush = [], []
    for n, t in ts.items():
        code = write.dtype_code(t.dtype)
        free = write.STAGING_BYTES - getattr(w._fh, "_fill", 0)  # (before the first reserve opens the file: all)
        dest = w.reserve(n, tuple(t.shape), code)
        if dest is not None and len(dest) > free:
            early_flush.append(n)  # the buffer's aligned part was written early, its tail moved on
        raw = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        if dest is None:
            w.write_bytes(n, tuple(t.shape), code, raw)
        else:
            dest[:] = raw
            w.commit(n, tuple(t.shape), code)
            in_place.append(n)
    assert w.close() == want
    assert (len(in_place) > 0) == (direct == "1") and len(in_place) < len(ts)  # both paths taken
    assert (early_flush == ["f"]) == (direct == "1"), early_flush
    for f in want:
        assert (tmp_path / "in_place" / f).read_bytes() == (tmp_path / "copied" / f).read_bytes(), f


def test_files_read_back_at_once_are_written_through_the_page_cache(tmp_path, monkeypatch):
    """direct=False (a LoRA expert's work files): the bytes stay in the page cache for the merge that
    reads them next; the default (the merge's output) goes straight to the disk where it can."""
    monkeypatch.setenv("OTA_TRAINER_DIRECT_IO", "1")
    t = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))  # 4 MB
    shares = {}
    for direct in (False, True):
        folder = tmp_path / f"direct_{direct}"
        folder.mkdir()
        w = StreamingSafetensorsWriter(folder, [("t", tuple(t.shape), t.dtype)], max_shard_bytes=1 << 30, direct=direct)
        w.write("t", t)
        w.close()
        shares[direct] = resident_share(folder / "model.safetensors")
        assert torch.equal(load_file(str(folder / "model.safetensors"))["t"], t)
    assert shares[False] == 1.0
    if direct_io_works(tmp_path):
        assert shares[True] < 0.1, shares  # (the page cache does not hold what went to the disk directly)


def test_aborted_writer_closes_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr(write, "STAGING_BYTES", 8192)
    ts = _tensors()
    w = StreamingSafetensorsWriter(
        tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in ts.items()], max_shard_bytes=10**9
    )
    w.write("a", ts["a"])
    w.abort()
    assert w._fh is None
    with pytest.raises(ValueError, match="expected 'a'"):
        StreamingSafetensorsWriter(tmp_path / "x", [("a", (1000, 7), torch.bfloat16)], max_shard_bytes=10**9).write(
            "b", ts["b"]
        )


def test_mapped_reads_equal_plain_reads_and_refuse_a_file_truncated_after_opening(tmp_path):
    ts = _tensors()
    save_file(ts, str(tmp_path / "model.safetensors"))
    folder = ModelFolder(tmp_path)
    for n, t in ts.items():
        assert torch.equal(folder.view(n), t) and torch.equal(folder.get(n), t), n
    folder.view("a")  # opens the file
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "model.safetensors") - 100)
    last = max(folder.tensors.values(), key=lambda t: t.offset + t.nbytes).name
    with pytest.raises(FormatError, match="truncated"):
        folder.view(last)


def test_readahead_finds_local_inputs_on_the_command_line_and_reads_them(tmp_path):
    for name in ("base", "e1", "e2"):
        (tmp_path / name / "ota").mkdir(parents=True)
        save_file(_tensors(), str(tmp_path / name / "model.safetensors"))
    (tmp_path / "e1" / "ota" / "moments.safetensors").write_bytes(b"x" * 10)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"base_model": str(tmp_path / "base"), "models": [str(tmp_path / "e1"), {"model": "org/hub-id"}]}
        )
    )
    got = readahead.local_models_in_args(
        ["--recipe", str(recipe), f"--expert={tmp_path / 'e2'}", "--expert", "org/other", "--out", "x"]
    )
    assert got == [tmp_path / "base", tmp_path / "e1", tmp_path / "e2"]
    assert readahead.local_models_in_args(["--recipe", str(tmp_path / "missing.yaml")]) == []
    files = [readahead.model_files(m) for m in got]
    assert files[1] == [tmp_path / "e1" / "model.safetensors", tmp_path / "e1" / "ota" / "moments.safetensors"]
    for touch in (False, True):
        readahead.readahead(
            files + [[tmp_path / "nope.safetensors"]], slice_bytes=4096, touch=touch
        )  # missing files are skipped
    readahead.start(files).join(timeout=30)
    assert readahead.start([list(reversed(f)) for f in files]) is None  # the same inputs again: once a process
    assert readahead.start([]) is None
