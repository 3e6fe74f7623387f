"""Issue #13: files that strangers wrote. Each test feeds the exact bad input the issue found
(tiny models: hidden 64, 2 layers) and checks a clean, one-line error naming the file, repo or
tensor, nothing at --out, no leftovers, and no input destroyed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from untrusted import copy_model, edit_header, leftovers, read_raw, run_cli, write_raw

from ota_trainer import merge
from ota_trainer.errors import (
    ConfigError,
    FormatError,
    IncompatibleModelsError,
    NumericalError,
    OTAError,
    OutputError,
    OutputExistsError,
)
from ota_trainer.io.write import OutputDir

NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
MOMENTS = Path("ota") / "moments.safetensors"


def _recipe(m, experts=("e3",), base="base", method="ota", **extra):
    r = {
        "method": method,
        "base_model": str(m[base] if base in m else base),
        "models": [str(m.get(e, e)) for e in experts],
    }
    r.update(extra)
    return r


def _both_paths(recipe, out, error, match=None):
    """The same error from the native fast path (default) and from the PyTorch engine."""
    for fast in (True, False):
        with pytest.raises(error, match=match) as e:
            merge(recipe, out, quiet=True, fast_path=fast)
        assert "\n" not in str(e.value) and len(str(e.value)) < 1500
    assert leftovers(out.parent) == []
    return e.value


@pytest.fixture
def trio(tiny_models, tmp_path):
    """Copies of the base and two rank-one experts (so the fast path covers their merge)."""
    from ota_trainer.testing.tiny import make_tiny_expert

    m = {"base": copy_model(tiny_models["base"], tmp_path / "base")}
    m["e3"] = make_tiny_expert(m["base"], tmp_path / "e3", seed=3, moments="rank1")
    m["e4"] = make_tiny_expert(m["base"], tmp_path / "e4", seed=4, moments="rank1")
    return m


# -- 1. headers: every offset, size, dtype and shape checked before any backend reads ------------------
def test_a_shape_larger_than_its_bytes_in_every_model_is_refused_not_read(trio, tmp_path):
    for name in ("base", "e3", "e4"):
        edit_header(trio[name] / "model.safetensors", lambda h, d: h[NORM].__setitem__("shape", [1000000]))
    e = _both_paths(_recipe(trio, ("e3", "e4")), tmp_path / "out", FormatError, NORM)
    assert "model.safetensors" in str(e)
    r = run_cli(
        [
            "--base",
            str(trio["base"]),
            "--expert",
            str(trio["e3"]),
            "--expert",
            str(trio["e4"]),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert r.returncode == 2 and NORM in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr  # was rc 139


def test_offsets_past_the_data_are_refused_not_read(trio, tmp_path):
    def point_at_the_end(h, data):
        n = h[EMBED]["data_offsets"][1] - h[EMBED]["data_offsets"][0]
        h[EMBED]["data_offsets"] = [len(data) - 16, len(data) - 16 + n]

    edit_header(trio["e3"] / "model.safetensors", point_at_the_end)
    _both_paths(_recipe(trio, ("e3", "e4")), tmp_path / "out", FormatError, "embed_tokens")
    edit_header(
        trio["e4"] / "model.safetensors", lambda h, d: h[EMBED].__setitem__("data_offsets", [len(d) - 16, len(d)])
    )
    _both_paths(
        _recipe(trio, ("e4",)), tmp_path / "out", FormatError, "embed_tokens"
    )  # was rc 0 with 1.8e37 in the output


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h, d: h[Q].__setitem__("data_offsets", h[Q]["data_offsets"][::-1]), "data_offsets"),  # reversed
        (
            lambda h, d: h[Q].__setitem__("data_offsets", [h[Q]["data_offsets"][0] - 64, h[Q]["data_offsets"][1] - 64]),
            "overlap|gap",
        ),
        (lambda h, d: h[Q].__setitem__("data_offsets", [h[Q]["data_offsets"][0]]), "data_offsets"),  # short
        (lambda h, d: h[Q].__setitem__("data_offsets", [-4, 8]), "data_offsets"),
        (lambda h, d: h[Q].__setitem__("dtype", "F64"), "data_offsets|F64"),  # F64 declared on F32 bytes
        (lambda h, d: h[Q].pop("shape") and None, "shape"),
        (lambda h, d: h[Q].__setitem__("shape", [32, -2]), "shape"),
        (lambda h, d: h[Q].__setitem__("dtype", "F8_E9M9"), "dtype"),
        (lambda h, d: h.__setitem__("__metadata__", {"format": 5}), "__metadata__"),
        (lambda h, d: d + b"\0" * 8, "after the last tensor"),  # trailing bytes
    ],
)
def test_malformed_headers_are_refused(trio, tmp_path, edit, match):
    edit_header(trio["e3"] / "model.safetensors", edit)
    _both_paths(_recipe(trio, ("e3", "e4")), tmp_path / "out", FormatError, match)


def test_an_integer_dtype_on_float_bytes_is_refused(trio, tmp_path):
    edit_header(
        trio["e3"] / "model.safetensors", lambda h, d: h[Q].__setitem__("dtype", "I32")
    )  # was rc 0, wrong merge
    e = _both_paths(_recipe(trio, ("e3", "e4")), tmp_path / "out", IncompatibleModelsError, "I32")
    assert e.tensor == Q


@pytest.mark.parametrize("dtype", ["I32", "BOOL", "F16", "F64"])
def test_moments_must_be_float32(trio, tmp_path, dtype):
    def retype(h, data):
        key = next(k for k in h if k.endswith("::row"))
        b, e = h[key]["data_offsets"]
        h[key]["dtype"] = dtype
        if dtype != "I32":  # keep the header consistent otherwise: shape scaled to the bytes
            h[key]["shape"] = [(e - b) // {"BOOL": 1, "F16": 2, "F64": 8}[dtype]]

    edit_header(trio["e3"] / MOMENTS, retype)
    _both_paths(_recipe(trio, ("e3", "e4")), tmp_path / "out", FormatError, "float32|shape")  # I32: was rc 0


def test_duplicate_keys_and_bad_json_are_refused(trio, tmp_path):
    header, data = read_raw(trio["e3"] / "model.safetensors")
    text = json.dumps(header)
    dup = text[:-1] + ', "model.norm.weight": ' + json.dumps(header[NORM]) + "}"
    write_raw(trio["e3"] / "model.safetensors", None, data, header_bytes=dup.encode())
    _both_paths(_recipe(trio, ("e3",)), tmp_path / "out", FormatError, "twice")
    write_raw(trio["e3"] / "model.safetensors", None, data, header_bytes=b"[" * 100000 + b"]" * 100000)
    _both_paths(_recipe(trio, ("e3",)), tmp_path / "out", FormatError, "corrupt")


# -- 2. --out never destroys an input ------------------------------------------------------------------
@pytest.mark.parametrize("where", ["base", "expert", "expert/ota", "parent", "link", "hf-cache"])
def test_out_may_not_be_contain_or_lie_inside_an_input_even_with_overwrite(trio, tmp_path, where, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(trio["e3"])
    out = {
        "base": trio["base"],
        "expert": trio["e3"],
        "expert/ota": trio["e3"] / "ota",
        "parent": tmp_path,
        "link": tmp_path / "link",
        "hf-cache": tmp_path / "hf" / "hub" / "merged",
    }[where]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match="input of this merge or the Hugging Face cache"):
        merge(_recipe(trio, ("e3", "e4")), out, overwrite=True, quiet=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    r = run_cli(
        [
            "--base",
            str(trio["base"]),
            "--expert",
            str(trio["e3"]),
            "--expert",
            str(trio["e4"]),
            "--out",
            str(out),
            "--overwrite",
        ],
        env={"HF_HOME": str(tmp_path / "hf")},
    )
    assert r.returncode == 2 and "refused even with --overwrite" in r.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_out_may_not_replace_the_recipe_file(trio, tmp_path):
    (tmp_path / "cfg").mkdir()
    recipe = tmp_path / "cfg" / "recipe.yaml"
    recipe.write_text(json.dumps(_recipe(trio, ("e3",))))
    r = run_cli(["--recipe", str(recipe), "--out", str(tmp_path / "cfg"), "--overwrite"])
    assert r.returncode == 2 and "refused even with --overwrite" in r.stderr and recipe.is_file()


# -- 3. the output: one merge at a time, never over something that appeared meanwhile -----------------
def test_a_second_merge_into_the_same_out_is_refused_while_one_runs(trio, tmp_path):
    out = tmp_path / "out"
    with OutputDir(out):  # a merge into out holds its lock
        with pytest.raises(OutputError, match="another merge is writing"):
            merge(_recipe(trio, ("e3",)), out, quiet=True)
        r = run_cli(["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(out)])
        assert r.returncode == 2 and "another merge is writing" in r.stderr
    assert leftovers(tmp_path) == []
    merge(_recipe(trio, ("e3",)), out, quiet=True)  # the lock is gone with the first merge
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path) == ["out"]


def test_two_merges_started_together_into_one_new_out(trio, tmp_path):
    """Was: both printed "merged ... into" and one output was lost. Now exactly one writes --out."""
    out = tmp_path / "out"
    args = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "scripts" / "merge_from_hub.py"),
        "--quiet",
        "--base",
        str(trio["base"]),
        "--out",
        str(out),
    ]
    procs = [
        subprocess.Popen(
            args + ["--expert", str(trio[e])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=os.getcwd()),
        )
        for e in ("e3", "e4")
    ]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    winner = next(i for i, (rc, _, _) in enumerate(results) if rc == 0)
    loser_err = next(err for rc, _, err in results if rc == 2)
    assert "another merge is writing" in loser_err or "not empty" in loser_err, loser_err
    recipe = json.loads((out / "ota_merge_report.json").read_text())["recipe"]
    assert recipe["models"][0]["model"] == str(trio[("e3", "e4")[winner]])  # the output is the winner's, whole
    assert leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("fast", [True, False])
def test_an_out_that_changes_during_the_merge_is_kept_and_the_merge_kept_beside_it(trio, tmp_path, fast):
    out = tmp_path / "out"

    def resolver(ref):  # runs once the output is locked and before any tensor is read: the user writes meanwhile
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")
        return Path(ref)

    with pytest.raises(OutputError, match="changed while the merge ran") as e:
        merge(_recipe(trio, ("e3", "e4")), out, quiet=True, resolver=resolver, fast_path=fast)
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]
    kept = Path(e.value.kept)
    assert kept.parent == tmp_path and kept.name.startswith("out.merged-") and str(kept) in str(e.value)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(kept)  # the finished merge, complete
    assert [p for p in leftovers(tmp_path) if p not in ("out", kept.name)] == []


# -- 4. every file a model folder names stays inside it ------------------------------------------------
def _shard(folder: Path) -> dict:
    """Split folder's model.safetensors into a one-entry index pointing at it (renamed)."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    header, _ = read_raw(folder / "model-00001-of-00001.safetensors")
    index = {
        "metadata": {},
        "weight_map": {k: "model-00001-of-00001.safetensors" for k in header if k != "__metadata__"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


@pytest.mark.parametrize("target", ["absolute", "dotdot"])
def test_an_index_pointing_outside_the_folder_is_refused(trio, tmp_path, target):
    index = _shard(trio["e3"])
    outside = copy_model(trio["e4"], tmp_path / "elsewhere") / "model.safetensors"
    ref = str(outside) if target == "absolute" else "../elsewhere/model.safetensors"
    index["weight_map"] = {k: ref for k in index["weight_map"]}
    (trio["e3"] / "model.safetensors.index.json").write_text(json.dumps(index))
    _both_paths(_recipe(trio, ("e3",)), tmp_path / "out", FormatError, "not a plain relative path")


def test_symlinks_out_of_the_folder_are_refused(trio, tmp_path):
    outside = copy_model(trio["e4"], tmp_path / "elsewhere")
    (trio["e3"] / "model.safetensors").unlink()
    (trio["e3"] / "model.safetensors").symlink_to(outside / "model.safetensors")
    _both_paths(_recipe(trio, ("e3",)), tmp_path / "out", FormatError, "outside the model folder")
    (trio["base"] / "tokenizer.json").symlink_to("/etc/passwd")  # was: the output held /etc/passwd
    _both_paths(_recipe(trio, ("e4",)), tmp_path / "out", FormatError, "tokenizer.json.*outside")
    (trio["base"] / "tokenizer.json").unlink()
    (trio["e4"] / "ota").rename(tmp_path / "ota-elsewhere")
    (trio["e4"] / "ota").symlink_to(tmp_path / "ota-elsewhere")
    _both_paths(_recipe(trio, ("e4",)), tmp_path / "out", FormatError, "outside the model folder")


def test_links_inside_the_folder_are_followed(trio, tmp_path):
    (trio["e3"] / "weights").mkdir()
    (trio["e3"] / "model.safetensors").rename(trio["e3"] / "weights" / "w.safetensors")
    (trio["e3"] / "model.safetensors").symlink_to("weights/w.safetensors")
    report = merge(_recipe(trio, ("e3",)), tmp_path / "out", quiet=True)
    assert report.files and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_fifo_named_like_a_weight_file_does_not_hang(trio, tmp_path):
    (trio["e3"] / "model.safetensors").unlink()
    os.mkfifo(trio["e3"] / "model.safetensors")
    _both_paths(_recipe(trio, ("e3",)), tmp_path / "out", FormatError, "not a regular file")
    r = run_cli(["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(tmp_path / "out")], timeout=60)
    assert r.returncode == 2 and "not a regular file" in r.stderr


@pytest.mark.local_hub
def test_a_hub_repo_whose_index_points_at_a_local_file_is_refused(local_hub, trio, tmp_path):
    from huggingface_hub import HfApi

    from ota_trainer.testing.pytest_fixtures import hub_env

    secret = copy_model(trio["e4"], tmp_path / "secret") / "model.safetensors"
    repo = tmp_path / "repo"
    (repo / "ota").mkdir(parents=True)
    shutil.copy(trio["e3"] / "config.json", repo / "config.json")
    shutil.copy(trio["e3"] / MOMENTS, repo / MOMENTS)
    header, _ = read_raw(trio["e3"] / "model.safetensors")
    index = {"weight_map": {k: str(secret) for k in header if k != "__metadata__"}}
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    HfApi().create_repo("mallory/expert")
    HfApi().upload_folder(repo_id="mallory/expert", folder_path=str(repo))
    r = run_cli(
        ["--base", str(trio["base"]), "--expert", "mallory/expert", "--out", str(tmp_path / "out")],
        env=hub_env(local_hub, os.environ["HF_HOME"]),
    )
    assert r.returncode == 2 and "mallory/expert" in r.stderr and "not a plain relative path" in r.stderr, r.stderr
    assert leftovers(tmp_path) == []


# -- 5. one line and exit 2, not a traceback ------------------------------------------------------------
def _cli_error(args, **kw) -> str:
    r = run_cli(args, **kw)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("content", [b"{not json", b"\x00\xff\xfe binary", b"[1, 2]", b'{"architectures": 5}'])
def test_bad_config_json(trio, tmp_path, content):
    (trio["e3"] / "config.json").write_bytes(content)
    line = _cli_error(["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(tmp_path / "out")])
    assert "config.json" in line


def _set_moments_meta(folder, **changes):
    def edit(h, d):
        meta = json.loads(h["__metadata__"]["ota_moments"])
        for k, v in changes.items():
            if k == "__whole__":
                h["__metadata__"]["ota_moments"] = v
                return
            meta[k] = v
        h["__metadata__"]["ota_moments"] = json.dumps(meta)

    edit_header(folder / MOMENTS, edit)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"__whole__": "5"}, "JSON object"),
        ({"__whole__": "null"}, "JSON object"),
        ({"__whole__": "[1]"}, "JSON object"),
        ({"beta2": 1.0}, "beta2"),
        ({"beta2": "abc"}, "beta2"),
        ({"beta2": 2.0}, "beta2"),
        ({"beta2": 1.5}, "beta2"),
        ({"step": "x"}, "step"),
        ({"step": -5}, "step"),
        ({"step": True}, "step"),
        ({"parameters": {Q: {"shape": "big", "stored": "rank1"}}}, "parameters"),
        ({"format_version": 1.0}, "version"),
        ({"bias_corrected": "yes"}, "bias_corrected"),
    ],
)
def test_bad_moments_metadata(trio, tmp_path, changes, match):
    _set_moments_meta(trio["e3"], **changes)
    line = _cli_error(["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(tmp_path / "out")])
    assert "moments.safetensors" in line and any(w in line for w in match.split("|")), line


def test_metadata_that_is_not_a_string_map(trio, tmp_path):
    edit_header(
        trio["e3"] / MOMENTS, lambda h, d: h["__metadata__"].__setitem__("ota_moments", {"format": "ota-moments"})
    )
    assert "__metadata__" in _cli_error(
        ["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(tmp_path / "out")]
    )


@pytest.mark.parametrize("weight_map", [["model-00001-of-00001.safetensors"], {NORM: 5}, {}])
def test_bad_index(trio, tmp_path, weight_map):
    index = _shard(trio["e3"])
    index["weight_map"] = weight_map
    (trio["e3"] / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "index" in _cli_error(
        ["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(tmp_path / "out")]
    )


def test_an_index_that_disagrees_with_the_headers(trio, tmp_path):
    index = _shard(trio["e3"])
    index["weight_map"]["model.layers.9.extra"] = "model-00001-of-00001.safetensors"
    (trio["e3"] / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "layers.9.extra" in _cli_error(
        ["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(tmp_path / "out")]
    )


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"method": "ota", "base_model": 5, "models": ["x"]}, "base_model"),
        ({"method": "ota", "base_model": "b", "models": 5}, "models"),
        ({"method": "ota", "base_model": "b", "models": ["x"], "parameters": [1, 2]}, "parameters"),
        ({"method": ["ota"], "base_model": "b", "models": ["x"]}, "method"),
        ({"method": "ota", "base_model": "b", "models": [{"model": "x", "parameters": [1]}]}, "parameters"),
        ({"method": "ota", "base_model": "b", "models": ["x"], "options": [1]}, "options"),
        ({"method": "ota", "base_model": "b", "models": ["x"], "options": {"shard_size": [1]}}, "size"),
        ("method: ota\nbase_model: b\nmodels: [x]\nparameters: {density: 1" + "0" * 5000 + "}\n", "YAML|density"),
        ({"method": "ota", "base_model": "b", "models": ["x"], "parameters": {"epsilon": 1e300}}, "epsilon"),
        ({"method": "ota", "base_model": "b", "models": ["x"], "parameters": {"power": -1}}, "power"),
        ({"method": "ota", "base_model": "b", "models": ["x"], "parameters": {"score": ["fisher"]}}, "score"),
        (
            {
                "method": "linear",
                "models": [{"model": "x", "parameters": {"weight": 1}}, {"model": "y", "parameters": {"weight": -1}}],
            },
            "sum to 0",
        ),
    ],
)
def test_bad_recipes(tmp_path, recipe, match):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    line = _cli_error(["--recipe", str(path), "--out", str(tmp_path / "out")])
    assert any(m in line for m in match.split("|")), line
    assert leftovers(tmp_path) == []


def test_a_yaml_tag_in_a_param_flag(trio, tmp_path):
    line = _cli_error(
        [
            "--base",
            str(trio["base"]),
            "--expert",
            str(trio["e3"]),
            "--out",
            str(tmp_path / "out"),
            "--param",
            "density=!!python/object/apply:os.system ['echo pwned']",
        ]
    )
    assert "--param" in line


def test_a_failed_merge_removes_the_parent_folders_it_made(trio, tmp_path):
    (trio["e3"] / "config.json").write_text("[1]")
    with pytest.raises(FormatError):
        merge(_recipe(trio, ("e3",)), tmp_path / "new" / "deeper" / "out", quiet=True)
    assert not (tmp_path / "new").exists()


def test_out_whose_parent_is_a_file(trio, tmp_path):
    (tmp_path / "file").write_text("x")
    line = _cli_error(
        ["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(tmp_path / "file" / "out")]
    )
    assert "is a file" in line and (tmp_path / "file").read_text() == "x"


def _unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_unshare = pytest.mark.skipif(
    not _unshare(), reason="needs user+mount namespaces (unshare -rm) for a small or read-only file system"
)


def _in_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a shell script as root of a new user+mount namespace (mounts there vanish with it)."""
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
    )


@needs_unshare
@pytest.mark.parametrize("direct", ["1", "0"])
def test_a_full_disk(trio, tmp_path, direct):
    disk = tmp_path / "disk"
    disk.mkdir()
    cli = (
        f"{sys.executable} scripts/merge_from_hub.py --quiet --base {trio['base']} --expert {trio['e3']} "
        f"--out {disk}/out"
    )
    r = _in_namespace(
        f"mount -t tmpfs -o size=256k tmpfs {disk} && OTA_TRAINER_DIRECT_IO={direct} {cli}; echo rc=$?; ls -A {disk}",
        tmp_path,
    )
    lines = r.stdout.strip().splitlines()
    assert "rc=2" in lines and lines[-1] == "rc=2", r.stdout + r.stderr  # nothing listed after it: the disk is empty
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "BufferError" not in r.stderr, r.stderr


@pytest.mark.parametrize("direct", ["1", "0"])
def test_a_write_error_in_the_writer_thread(trio, tmp_path, direct):
    """A file-size limit (SIGXFSZ ignored: writes fail with EFBIG) hits the direct-I/O writer's
    background thread where the file system allows O_DIRECT, else the buffered writes."""
    cli = (
        f"trap '' XFSZ; ulimit -f 64; OTA_TRAINER_DIRECT_IO={direct} "
        f"{sys.executable} scripts/merge_from_hub.py --quiet "
        f"--base {trio['base']} --expert {trio['e3']} --out {tmp_path}/out"
    )
    r = subprocess.run(
        ["sh", "-c", cli], capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.getcwd())
    )
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "File too large" in err[0] and "BufferError" not in r.stderr, (
        r.stderr
    )
    assert leftovers(tmp_path) == []


@needs_unshare
def test_a_read_only_out(trio, tmp_path):
    ro = tmp_path / "ro"
    (ro / "out").mkdir(parents=True)
    cli = (
        f"{sys.executable} scripts/merge_from_hub.py --quiet --base {trio['base']} --expert {trio['e3']} "
        f"--out {ro}/out --overwrite"
    )
    r = _in_namespace(f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && {cli}; echo rc=$?", tmp_path)
    assert r.stdout.strip().endswith("rc=2"), r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0], r.stderr


def test_a_read_only_out_as_an_unprivileged_user(trio, tmp_path):
    """Without namespaces: a folder we may not write (only meaningful when not root)."""
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "Permission denied" in _cli_error(
            ["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(ro / "out")]
        )
    finally:
        ro.chmod(0o755)


# -- 6. messages built from user data are bounded ---------------------------------------------------------
def test_nested_yaml_aliases_do_not_hang(tmp_path):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    lines += ["method: ota", "base_model: b", "models: [x]", "parameters: {density: *a8}"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1500
    start = time.perf_counter()
    line = _cli_error(["--recipe", str(path), "--out", str(tmp_path / "out")], timeout=60)
    assert time.perf_counter() - start < 30 and len(line) < 600


def test_a_huge_tensor_name_gives_a_short_message(trio, tmp_path):
    def rename(h, d):
        h["x" * 2_000_000] = h.pop(NORM)

    edit_header(trio["e3"] / "model.safetensors", rename)
    line = _cli_error(["--base", str(trio["base"]), "--expert", str(trio["e3"]), "--out", str(tmp_path / "out")])
    assert len(line) < 1000


# -- 7. accepted without a word no more -------------------------------------------------------------------
def test_the_same_expert_twice(trio, tmp_path):
    (tmp_path / "alias").symlink_to(trio["e3"])
    with pytest.raises(ConfigError, match="listed twice.*weight: 2"):
        merge(_recipe(trio, ("e3", str(tmp_path / "alias"))), tmp_path / "out", quiet=True)


@pytest.mark.parametrize("compression", ["rank1", "full"])
def test_all_zero_moments(trio, tmp_path, compression):
    from ota_trainer.testing.tiny import make_tiny_expert

    make_tiny_expert(trio["base"], tmp_path / "e5", seed=5, moments=compression)
    edit_header(tmp_path / "e5" / MOMENTS, lambda h, data: bytes(len(data)))  # every stored value 0.0
    _both_paths(_recipe(trio, ("e4", str(tmp_path / "e5"))), tmp_path / "out", NumericalError, "all zero")

    # one non-zero entry stored whole (read only in this case) makes it a real, if odd, moments file
    def one(h, data):
        key = (
            next(k for k, v in h.items() if k != "__metadata__" and len(v["shape"]) == 2 and "::" not in k)
            if compression == "full"
            else next(k for k in h if k.endswith("::row"))
        )
        b = h[key]["data_offsets"][0]
        return data[:b] + b"\x00\x00\x80\x3f" + data[b + 4 :]  # 1.0

    edit_header(tmp_path / "e5" / MOMENTS, one)
    merge(_recipe(trio, ("e4", str(tmp_path / "e5"))), tmp_path / "out", quiet=True)


def test_a_base_without_config_json(trio, tmp_path):
    (trio["base"] / "config.json").unlink()
    _both_paths(_recipe(trio, ("e3",)), tmp_path / "out", FormatError, "no config.json")


def test_moments_of_another_scale_are_warned_about(trio, tmp_path, caplog):
    import logging

    from ota_trainer import load_moments, save_moments

    m = load_moments(trio["e4"])
    meta = {k: m.metadata[k] for k in ("step", "beta2", "optimizer")}
    save_moments(trio["e4"], {n: m[n] * 2.0**-13 for n in m}, compression="rank1", metadata=meta)  # max_grad_norm 0.01
    with caplog.at_level(logging.WARNING):
        merge(_recipe(trio, ("e3", "e4")), tmp_path / "out", quiet=True)
    assert re.search(r"differ in scale by [78]\.\d+e\+03x", caplog.text) and "normalise: mean" in caplog.text


def test_experts_trained_with_different_settings_are_warned_about(trio, tmp_path, caplog):
    """lr, clipping and batch size from the moments' metadata (as OTACallback records them) are
    compared: a difference is named with the experts, the values and the ratio, and the remedy."""
    import logging

    from ota_trainer import load_moments, save_moments

    for key, lr, clip in (("e3", 1e-4, 1.0), ("e4", 1e-5, 0.01)):
        m = load_moments(trio[key])
        meta = {k: m.metadata[k] for k in ("step", "beta2", "optimizer")}
        meta["training"] = {
            "learning_rate": lr,
            "max_grad_norm": clip,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "world_size": 1,
        }
        save_moments(trio[key], {n: m[n] for n in m}, compression="rank1", metadata=meta)
    with caplog.at_level(logging.WARNING):
        merge(_recipe(trio, ("e3", "e4")), tmp_path / "out", quiet=True)
    text = caplog.text
    assert "trained with different settings" in text and "normalise: mean" in text
    assert re.search(r"learning_rate 0\.0001 \(\S*e3\) vs 1e-05 \(\S*e4\), 10x", text), text
    assert re.search(r"max_grad_norm 1 \(\S*e3\) vs 0\.01 \(\S*e4\), 100x", text) and "batch size" not in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the remedy applied: nothing to warn about
        merge({**_recipe(trio, ("e3", "e4")), "parameters": {"normalise": "mean"}}, tmp_path / "out2", quiet=True)
    assert "trained with different settings" not in caplog.text


# -- 8. leftovers of killed merges --------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_what_a_killed_merge_left_is_cleaned_by_the_next(trio, tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".out.lock").write_text("")
    alive = tmp_path / f".out.tmp-{os.getppid()}"  # a live process's: not ours to remove
    alive.mkdir()
    merge(_recipe(trio, ("e3",)), tmp_path / "out", quiet=True)
    assert not stale.exists() and alive.exists() and not (tmp_path / ".out.lock").exists()


def test_a_previous_output_moved_aside_by_a_killed_merge_is_restored(trio, tmp_path):
    merge(_recipe(trio, ("e3",)), tmp_path / "out", quiet=True)
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    aside = tmp_path / f".out.old-{_dead_pid()}"
    (tmp_path / "out").rename(aside)  # killed between moving the old output aside and the new one in
    with pytest.raises(OutputExistsError):  # restored first, then refused without --overwrite
        merge(_recipe(trio, ("e4",)), tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before and not aside.exists()


def test_a_killed_cli_merge_leaves_nothing_the_next_run_keeps(trio, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "scripts/merge_from_hub.py",
            "--quiet",
            "--base",
            str(trio["base"]),
            "--expert",
            str(trio["e3"]),
            "--out",
            str(tmp_path / "out"),
            "--method",
            "ota",
            "--normalise",
            "mean",
        ],
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    merge(_recipe(trio, ("e3",)), tmp_path / "out", quiet=True)
    assert leftovers(tmp_path) == ["out"]


# -- 9. moments that belong to other weights ----------------------------------------------------------------
def test_moments_of_another_training_step(trio, tmp_path):
    (trio["e3"] / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    _set_moments_meta(trio["e3"], global_step=60)
    _both_paths(_recipe(trio, ("e3",)), tmp_path / "out", IncompatibleModelsError, "step 60.*step 40")


def test_moments_newer_than_weights_they_were_written_before(trio, tmp_path):
    _set_moments_meta(trio["e3"], captured_at=time.time(), written_before_weights=True)
    old = time.time() - 3600
    os.utime(trio["e3"] / "model.safetensors", (old, old))  # an earlier run's weights
    _both_paths(_recipe(trio, ("e3",)), tmp_path / "out", IncompatibleModelsError, "earlier run")
    os.utime(trio["e3"] / "model.safetensors")  # saved after the capture, as OTACallback's flow does
    merge(_recipe(trio, ("e3",)), tmp_path / "out", quiet=True)


def test_finite_inputs_that_overflow_name_the_input_not_the_engine(trio, tmp_path):
    from safetensors.torch import save_file

    for e in ("e3", "e4"):
        w = load_file(str(trio[e] / "model.safetensors"))
        w[NORM].fill_(3e38)  # finite, but no trained model's
        save_file(w, str(trio[e] / "model.safetensors"), metadata={"format": "pt"})
    e = _both_paths(
        _recipe(trio, ("e3", "e4"), method="task_arithmetic"), tmp_path / "out", NumericalError, "overflows float32"
    )
    assert "3e+38" in str(e) and "weights" in str(e) and e.tensor == NORM


# -- a merge that passes every check is still right -----------------------------------------------------------
def test_valid_inputs_still_merge_the_same_on_both_paths(trio, tmp_path):
    merge(_recipe(trio, ("e3", "e4")), tmp_path / "a", quiet=True)
    merge(_recipe(trio, ("e3", "e4")), tmp_path / "b", quiet=True, fast_path=False)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_errors_are_ota_errors_with_a_builtin_base():
    assert issubclass(OutputError, OTAError) and issubclass(OutputError, OSError)
    assert str(OutputError("x", path="p")) == "x"
