"""Property-based fuzzing of everything a merge reads (issue #13), with hypothesis.

A case is a tiny valid merge (a base and two experts, one with rank-one and one with full
moments) that one to three *mutations* then damage the way a stranger's Hub repo could:
header fields (dtype, shape, data_offsets), header entries, metadata JSON (safetensors and
moments), raw bytes (header length, header text, data), tensor values (NaN, Inf, negative,
huge, subnormal), index files, config.json, links out of the folder, the recipe, and the
same change in every model at once; and valid but unusual inputs the kernels must handle
(tensors reshaped to empty, scalar, 3-D... in every model, mixed float dtypes). The property
(:func:`check_case`): the merge ends either

- in an :class:`~ota_trainer.errors.OTAError` of one short line, with nothing at ``--out`` and
  nothing left beside it; or
- in a merge equal, byte for byte, to what the pure PyTorch engine (native kernels off, no fast
  path) writes for the same damaged inputs, which must also succeed;

never in another exception, a crash, a hang, or success where the reference fails.

``tests/test_fuzz_inputs.py`` runs a fixed-seed, bounded number of cases in ``make test``;
``scripts/fuzz_inputs.py`` runs as many as asked and prints what it found.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

MODELS = ("base", "e1", "e2")
WEIGHTS = "model.safetensors"
MOMENTS = "ota/moments.safetensors"
HISTOGRAM = "ota/ffg_histogram.safetensors"  # the experts ship theirs: a damaged or stale one must change no byte
PARAM_KEYS = (
    "density",
    "threshold",
    "saliency_share",
    "per_tensor",
    "score",
    "graft",
    "power",
    "epsilon",
    "normalise",
    "bias_correction",
    "weight",
    "lambda",
    "drop_rate",
    "seed",
    "gamma",
    "bogus",
)
MOMENT_KEYS = (
    "format",
    "format_version",
    "compression",
    "optimizer",
    "beta2",
    "step",
    "dtype",
    "bias_corrected",
    "parameters",
    "global_step",
    "captured_at",
    "written_before_weights",
    "base_model",
)
CASE_TIMEOUT_S = 60


def build_template(root: Path) -> Path:
    """The valid starting point of every case: ``root/{base,e1,e2}`` (fp32, hidden 32, 2 layers),
    the experts shipping their FFG histograms."""
    import torch

    from ota_trainer.testing.tiny import make_tiny_base, make_tiny_expert

    root.mkdir(parents=True, exist_ok=True)
    base = make_tiny_base(root / "base", seed=0, hidden=32, vocab=64, heads=2, kv_heads=1)
    from ota_trainer import save_ffg_histogram

    for k, moments in ((1, "rank1"), (2, "full")):
        expert = make_tiny_expert(base, root / f"e{k}", seed=k, moments=moments, step=100 if k == 1 else 50)
        save_ffg_histogram(expert, base)
    del torch
    return root


# -- raw files ----------------------------------------------------------------------------------------
def _split(raw: bytes) -> tuple[bytes, bytes, bytes]:
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else 0
    return raw[:8], raw[8 : 8 + n], raw[8 + n :]


def _header(path: Path) -> dict[str, Any]:
    return json.loads(_split(path.read_bytes())[1])


def _put_header(path: Path, header: Any, data: bytes | None = None) -> None:
    _, _, old = _split(path.read_bytes())
    hb = json.dumps(header).encode()
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + (old if data is None else data))


def _entries(header: dict[str, Any]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# -- mutations ----------------------------------------------------------------------------------------
@dataclass
class Mutation:
    """One change to a case; ``apply(case_dir)`` makes it, ``text`` says what it was."""

    text: str
    apply: Callable[[Path], None] = field(repr=False)

    def __repr__(self) -> str:
        return self.text


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**66), 2**66)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
small = st.integers(-9, 9)
models = st.sampled_from(MODELS)
files = st.sampled_from((WEIGHTS, MOMENTS, HISTOGRAM))


def _target(case: Path, model: str, file: str) -> Path | None:
    p = case / model / file
    return p if p.is_file() and not p.is_symlink() else None


def _edit_entry(case: Path, model: str, file: str, k: int, edit: Callable[[dict[str, Any], str], None]) -> None:
    """``edit(header, name)`` on tensor entry ``k`` (modulo their number) of a case file's header,
    written back; nothing when the file or entry is not there."""
    path = _target(case, model, file)
    if path is None:
        return
    h = _header(path)
    names = _entries(h)
    if names:
        edit(h, names[k % len(names)])
        _put_header(path, h)


@st.composite
def header_field(draw) -> Mutation:
    model, file, k = draw(models), draw(files), draw(st.integers(0, 63))
    fld = draw(st.sampled_from(("dtype", "shape", "data_offsets", "drop")))
    if fld == "dtype":
        value = draw(
            st.sampled_from(("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "f32"))
            | json_values
        )
    elif fld == "shape":
        value = draw(
            st.one_of(
                st.lists(st.integers(-3, 2**33) | st.sampled_from((0, 1, 2, 32, 64, 2**40)), max_size=4),
                json_values,
                st.just("scale"),
            )
        )
    elif fld == "data_offsets":
        value = draw(st.one_of(st.tuples(small, small), st.just("swap"), st.just("zero"), json_values))
    else:
        value = draw(st.sampled_from(("dtype", "shape", "data_offsets")))

    def edit(h: dict[str, Any], name: str) -> None:
        info = h[name]
        if not isinstance(info, dict):
            return
        if fld == "drop":
            info.pop(value, None)
        elif fld == "data_offsets" and isinstance(value, tuple):
            b, e = info["data_offsets"]
            info["data_offsets"] = [b + value[0] * 4, e + value[1] * 4]
        elif fld == "data_offsets" and value == "swap":
            info["data_offsets"] = info["data_offsets"][::-1]
        elif fld == "data_offsets" and value == "zero":
            info["data_offsets"] = [0, info["data_offsets"][1] - info["data_offsets"][0]]
        elif fld == "shape" and value == "scale":
            info["shape"] = [d * 2 for d in info["shape"]] or [2]
        else:
            info[fld] = value

    def apply(case: Path) -> None:
        _edit_entry(case, model, file, k, edit)

    return Mutation(f"{model}/{file}: entry #{k} {fld} -> {value!r}", apply)


@st.composite
def header_entry(draw) -> Mutation:
    model, file, k = draw(models), draw(files), draw(st.integers(0, 63))
    how = draw(st.sampled_from(("delete", "duplicate", "rename", "add", "replace")))
    value = draw(json_values)

    def edit(h: dict[str, Any], name: str) -> None:
        if how == "delete":
            h.pop(name)
        elif how == "duplicate":
            h[name + ".copy"] = h[name]
        elif how == "rename":
            h["x" + name] = h.pop(name)
        elif how == "add":
            h["added.weight"] = value
        else:
            h[name] = value

    def apply(case: Path) -> None:
        _edit_entry(case, model, file, k, edit)

    return Mutation(f"{model}/{file}: {how} entry #{k} ({value!r})", apply)


@st.composite
def metadata(draw) -> Mutation:
    model, file = draw(models), draw(files)
    key = draw(st.sampled_from(MOMENT_KEYS) | st.text(max_size=4))
    whole = draw(st.booleans())
    value = draw(
        json_values | st.sampled_from((1.0, 0.0, -5, 2**53, 1e300, "rank1", "full", "ota-moments", 2, 0.999999999))
    )

    def apply(case: Path) -> None:
        path = _target(case, model, file)
        if path is None:
            return
        h = _header(path)
        meta = h.get("__metadata__")
        if whole or not isinstance(meta, dict):
            h["__metadata__"] = value
        elif "ota_moments" in meta:
            try:
                inner = json.loads(meta["ota_moments"])
                inner[key] = value
                meta["ota_moments"] = json.dumps(inner)
            except (ValueError, TypeError):
                meta["ota_moments"] = json.dumps(value)
        else:
            meta[key] = value
        _put_header(path, h)

    return Mutation(f"{model}/{file}: metadata {'whole' if whole else key} -> {value!r}", apply)


@st.composite
def raw_bytes(draw) -> Mutation:
    model, file = draw(models), draw(files)
    how = draw(st.sampled_from(("overwrite", "truncate", "append", "length")))
    where = draw(st.floats(0, 1))
    data = draw(st.binary(min_size=1, max_size=16))

    def apply(case: Path) -> None:
        path = _target(case, model, file)
        if path is None:
            return
        raw = bytearray(path.read_bytes())
        pos = int(where * (len(raw) - 1))
        if how == "overwrite":
            raw[pos : pos + len(data)] = data
        elif how == "truncate":
            del raw[pos:]
        elif how == "append":
            raw += data
        else:
            raw[:8] = (
                int.from_bytes(raw[:8], "little") + int.from_bytes(data[:2], "little", signed=True) % 64 - 32
            ).to_bytes(8, "little", signed=True)
        path.write_bytes(bytes(raw))

    return Mutation(f"{model}/{file}: {how} at {where:.3f} with {data.hex()}", apply)


SPECIAL = (math.nan, math.inf, -math.inf, -1.0, 0.0, 3.4e38, -3.4e38, 1e-45, 1e30, 65504.0)


@st.composite
def values(draw) -> Mutation:
    model, file, k = draw(models), draw(files), draw(st.integers(0, 63))
    value, all_of_it = draw(st.sampled_from(SPECIAL)), draw(st.booleans())

    def apply(case: Path) -> None:
        path = _target(case, model, file)
        if path is None:
            return
        h = _header(path)
        names = [n for n in _entries(h) if h[n].get("dtype") == "F32"]
        if not names:
            return
        b, e = h[names[k % len(names)]]["data_offsets"]
        head, hb, data = _split(path.read_bytes())
        data = bytearray(data)
        word = struct.pack("<f", value)
        for off in range(b, e if all_of_it else min(e, b + 4), 4):
            data[off : off + 4] = word
        path.write_bytes(head + hb + bytes(data))

    return Mutation(f"{model}/{file}: entry #{k} {'all' if all_of_it else 'one'} = {value}", apply)


@st.composite
def index(draw) -> Mutation:
    model = draw(models)
    how = draw(st.sampled_from(("valid", "json", "absolute", "dotdot", "extra", "missing", "subdir")))
    value = draw(json_values)

    def apply(case: Path) -> None:
        folder = case / model
        if not (folder / WEIGHTS).is_file() or (folder / WEIGHTS).is_symlink():
            return
        shard = "model-00001-of-00001.safetensors"
        h = _header(folder / WEIGHTS)
        (folder / WEIGHTS).rename(folder / shard)
        wm: Any = {n: shard for n in _entries(h)}
        if how == "json":
            wm = value
        elif how == "absolute":
            wm = {n: str(case / "e1" / WEIGHTS) for n in wm}
        elif how == "dotdot":
            wm = {n: "../e1/" + shard for n in wm}
        elif how == "extra":
            wm["extra.weight"] = shard
        elif how == "missing" and wm:
            wm.pop(sorted(wm)[0])
        elif how == "subdir":
            (folder / "w").mkdir()
            (folder / shard).rename(folder / "w" / shard)
            wm = {n: "w/" + shard for n in wm}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))

    return Mutation(f"{model}: index {how} ({value!r})", apply)


@st.composite
def config(draw) -> Mutation:
    model = draw(models)
    content = draw(
        st.one_of(
            json_values.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=20),
            st.just(b'{"architectures": ["MistralForCausalLM"]}'),
            st.just(None),
        )
    )

    def apply(case: Path) -> None:
        path = case / model / "config.json"
        if path.is_symlink() or (path.exists() and not path.is_file()):
            return  # replaced by an earlier change (writing into a FIFO would wait forever)
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)

    return Mutation(f"{model}/config.json -> {content!r}", apply)


@st.composite
def link_out(draw) -> Mutation:
    model = draw(models)
    name = draw(st.sampled_from((WEIGHTS, MOMENTS, "config.json", "tokenizer.json", "ota")))
    target = draw(st.sampled_from(("outside", "fifo", "dangling", "dir")))

    def apply(case: Path) -> None:
        path = case / model / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        if target == "outside":
            outside = case.parent / f"{case.name}-outside-{name.replace('/', '_')}"
            src = case / "e1" / (name if (case / "e1" / name).exists() else WEIGHTS)
            if not outside.exists():
                shutil.copytree(src, outside) if src.is_dir() else shutil.copy(src, outside)
            path.symlink_to(outside)
        elif target == "fifo":
            os.mkfifo(path)
        elif target == "dangling":
            path.symlink_to(case / "nowhere")
        else:
            path.mkdir()

    return Mutation(f"{model}/{name} -> {target}", apply)


@st.composite
def everywhere(draw) -> Mutation:
    """The same header change in every model's weights (what one model's checks cannot catch)."""
    k = draw(st.integers(0, 63))
    how = draw(st.sampled_from(("shape", "dtype", "empty")))
    value = draw(st.sampled_from(([1000000], [0], [2, 0], [], "BF16", "F64", "I32")))

    def edit(h: dict[str, Any], name: str) -> None:
        info = h[name]
        if not isinstance(info, dict):
            return
        if how == "shape" and isinstance(value, list):
            info["shape"] = value
        elif how == "dtype" and isinstance(value, str):
            info["dtype"] = value
        elif how == "empty":
            info["shape"] = [0]
            info["data_offsets"] = [info["data_offsets"][0]] * 2

    def apply(case: Path) -> None:
        for model in MODELS:
            _edit_entry(case, model, WEIGHTS, k, edit)

    return Mutation(f"every model: entry #{k} {how} -> {value!r}", apply)


@st.composite
def reshape(draw) -> Mutation:
    """A VALID change the kernels must handle: one tensor given another shape (empty, a scalar, a
    row, 3-D...) in every model, with moments to match (rank-one in e1, whole in e2)."""
    k = draw(st.integers(0, 63))
    shape = draw(st.sampled_from(([0], [0, 5], [5, 0], [], [1], [1, 1], [3, 1, 2], [7], [1, 300], [300, 1])))
    seed = draw(st.integers(0, 2**16))

    def apply(case: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        from ota_trainer.moments.format import load_moments, save_moments

        if any(_target(case, m, f) is None for m in MODELS for f in (WEIGHTS, MOMENTS) if (m, f) != ("base", MOMENTS)):
            return  # a file an earlier change replaced (a link, a FIFO...)
        g = torch.Generator().manual_seed(seed)
        names = sorted(load_file(str(case / "base" / WEIGHTS)))
        name = names[k % len(names)]
        base = torch.randn(shape, generator=g)
        for model in MODELS:
            w = load_file(str(case / model / WEIGHTS))
            w[name] = base + (0 if model == "base" else 0.02 * torch.randn(shape, generator=g))
            save_file(w, str(case / model / WEIGHTS), metadata={"format": "pt"})
        for model, compression in (("e1", "rank1"), ("e2", "full")):
            m = load_moments(case / model)
            moments = {n: (torch.rand(shape, generator=g) * 1e-6 if n == name else m[n]) for n in m}
            save_moments(
                case / model, moments, compression=compression, metadata={k: m.metadata[k] for k in ("beta2", "step")}
            )

    return Mutation(f"every model: entry #{k} reshaped to {shape}", apply)


@st.composite
def retype(draw) -> Mutation:
    """A VALID change: one tensor of one model stored in another float dtype (a mixed-dtype merge)."""
    model, k = draw(models), draw(st.integers(0, 63))
    dtype = draw(st.sampled_from(("bfloat16", "float16", "float64")))

    def apply(case: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        if _target(case, model, WEIGHTS) is None:
            return  # a file an earlier change replaced (a link, a FIFO...)
        w = load_file(str(case / model / WEIGHTS))
        names = sorted(w)
        w[names[k % len(names)]] = w[names[k % len(names)]].to(getattr(torch, dtype))
        save_file(w, str(case / model / WEIGHTS), metadata={"format": "pt"})

    return Mutation(f"{model}: entry #{k} stored as {dtype}", apply)


mutations = st.one_of(
    header_field(),
    header_entry(),
    metadata(),
    raw_bytes(),
    values(),
    index(),
    config(),
    link_out(),
    everywhere(),
    reshape(),
    retype(),
)


@st.composite
def recipes(draw) -> dict[str, Any]:
    from ota_trainer.merger.methods import METHODS

    # every registered method; the ones with native implementations (two backends to agree) weigh more
    method = draw(st.sampled_from([m for m in METHODS for _ in range(3 if METHODS[m].native else 1)]))
    params: dict[str, Any] = {}
    keys = draw(st.lists(st.sampled_from(PARAM_KEYS), max_size=2, unique=True)) if draw(st.integers(0, 3)) == 0 else []
    for key in keys:  # a quarter of the cases damage the recipe; the others reach the files
        params[key] = draw(
            st.one_of(
                json_values, st.sampled_from((0.4, 0.5, 1.0, 0.0, -1.0, 2.0, 1e-9, "mean", "magnitude", True, False, 3))
            )
        )
    recipe: dict[str, Any] = {"method": method, "models": ["e1", "e2"], "parameters": params}
    if METHODS[method].needs_base or draw(st.booleans()):
        recipe["base_model"] = "base"
    if draw(st.booleans()):
        recipe["dtype"] = draw(st.sampled_from(("bfloat16", "float16", "float32")))
    return recipe


# -- running a case -----------------------------------------------------------------------------------
@contextmanager
def _deadline(seconds: float):
    """A Python-level hang becomes an exception (a hang inside native code shows as a test timeout)."""

    def fire(signum, frame):
        raise TimeoutError(f"a merge ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json", "config.json"):
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    report = json.loads((folder / "ota_merge_report.json").read_text())
    out["density"] = json.dumps([report["experts"], report["tensor_density"]], sort_keys=True)
    return out


def _outcome(recipe: dict[str, Any], out: Path, **kw) -> tuple[str, Any]:
    """("merged", digest) or ("error", (class name, message)); checks what an error leaves."""
    from ota_trainer import merge
    from ota_trainer.errors import OTAError

    try:
        with _deadline(CASE_TIMEOUT_S):
            merge(recipe, out, quiet=True, **kw)
    except OTAError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) <= 3000, f"error message not one short line: {msg[:3000]!r}"
        left = [
            p.name
            for p in out.parent.iterdir()
            if p.name == out.name or p.name.startswith(f".{out.name}.") or p.name.startswith(f"{out.name}.merged-")
        ]
        assert not left, f"{type(e).__name__} left {left}"
        return "error", (type(e).__name__, msg)
    return "merged", _digest(out)


def check_case(template: Path, recipe: dict[str, Any], changes: list[Mutation]) -> str:
    """Apply the mutations to a copy of ``template`` and check the property (see the module
    docstring); returns the outcome's kind ("merged" or the error class)."""
    import logging

    log = logging.getLogger("ota_trainer")
    level = log.level
    log.setLevel(logging.ERROR)  # damaged inputs warn a lot
    work = Path(tempfile.mkdtemp(prefix="ota-fuzz-"))
    try:
        case = work / "case"
        shutil.copytree(template, case, symlinks=True)
        for change in changes:
            try:
                change.apply(case)
            except Exception:  # noqa: BLE001 - a change to a file an earlier one broke beyond reading: nothing to change
                pass
        recipe = dict(recipe)
        recipe["models"] = [str(case / m) for m in recipe["models"]]
        if recipe.get("base_model"):
            recipe["base_model"] = str(case / recipe["base_model"])
        before = _tree(case)
        got = _outcome(recipe, work / "out")
        with _env(OTA_TRAINER_NATIVE="0"):
            want = _outcome(recipe, work / "ref", fast_path=False)
        assert _tree(case) == before, "an input changed"
        assert got[0] == want[0], (
            f"default merge: {got[0]} {str(got[1])[:300]}; PyTorch engine: {want[0]} {str(want[1])[:300]}"
        )
        if got[0] == "error":
            assert got[1][0] == want[1][0], f"errors differ: {got[1]} vs {want[1]}"
            return got[1][0]
        assert got[1] == want[1], "the merge differs from the PyTorch engine's"
        return "merged"
    finally:
        log.setLevel(level)
        shutil.rmtree(work, ignore_errors=True)


def _tree(folder: Path) -> dict[str, Any]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
