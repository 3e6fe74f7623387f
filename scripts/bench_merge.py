#!/usr/bin/env python
"""Benchmark the streaming merge engine against the copy limit and mergekit's TIES.

Builds synthetic Llama checkpoints (random bf16 weights: a base, two experts = base + small
noise, rank-one second moments beside each expert), at a given size and at twice the depth,
then measures in ONE run, each contender in a fresh subprocess with the same page-cache state, the
repeats going round the contenders (so a drifting disk or VM pace reaches every contender alike):

* copy limit: read every input file the merge reads once and write an output of the merged
  model's size (weights only for ties/mergekit; weights + moments for ota); and, for information,
  the same copy on every core (the inputs split into balanced groups, one process per core);
* ours: ``ota`` (FFG density 0.4, rank-one moments) and ``ties`` (density 0.4), through
  ``scripts/merge_from_hub.py --recipe R.yaml --out DIR --overwrite --quiet``;
* with ``--lora R``: ``ota`` of one rank-R LoRA adapter per expert (PEFT's files, ``q_proj`` and
  ``v_proj``, rank-one moments of the adapted weights) on the same base, against its own copy
  limit (read the base, the adapters and their moments; write the merged model);
* mergekit's TIES (density 0.4, same inputs), from a separate bench-only venv
  (``<work>/mergekit-venv``; mergekit is not a dependency of ota_trainer).

Prints wall time, CPU time, peak RSS and ratios as a Markdown table, and PASS/FAIL against
the targets: ours <= 1.2x the copy limit, <= 0.5x mergekit TIES, and peak RSS grows < 10%
when the depth doubles. Figures only: this is not a test.

    # quick sanity run (~50M parameters, a few minutes including the mergekit venv)
    .venv/bin/python scripts/bench_merge.py --small

    # the full run (0.5B and its 2x deeper 0.94B variant; ~30 minutes on 2 cores, plus ~5 to build)
    .venv/bin/python scripts/bench_merge.py --json bench_out/bench.json > bench_out/bench.md

    # skip mergekit, or reuse a venv made elsewhere
    .venv/bin/python scripts/bench_merge.py --small --no-mergekit

    # on a VM that hands freed memory back to its host: every contender after 10 s idle
    .venv/bin/python scripts/bench_merge.py --no-mergekit --settle 10
    .venv/bin/python scripts/bench_merge.py --mergekit-venv /path/to/venv

Checkpoints are cached under ``--work`` (default ``bench_out/``, gitignored), keyed by shape,
and reused. The page cache is dropped before every measurement when that works (root);
otherwise every input is read once before every measurement (warm cache). The table says which.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from machine import cpu_description, free_page_reporting

REPO = Path(__file__).resolve().parents[1]
MERGE_CLI = REPO / "scripts" / "merge_from_hub.py"
REMERGE = "ours: ota (re-merge)"  # the same merge again: FFG's histograms from the cache
SHIPPED = "ours: ota (shipped histograms)"  # a first merge of experts that ship their FFG histograms
LORA = "ours: ota (LoRA adapters)"  # --lora R: one adapter per expert instead of its full fine-tune
LORA_COPY = "copy limit (base + adapters)"
# (info) the copy split over every core, one process each: where first-touch page faults, not the
# disk, set the pace (a VM with free page reporting, --settle), one process's copy is CPU-bound
PARALLEL_COPY = "copy on every core (weights+moments)"
LORA_TARGETS = ("q_proj", "v_proj")
DENSITY = 0.4
NOISE_STD = 2e-3  # expert edits; base weights are N(0, 0.02)
BASE_STD = 0.02
EXPERTS = ("expert_a", "expert_b")  # --experts N: expert_a ... (the paper merges 5)
READY = ".complete"  # marker: a cached checkpoint set finished building
CHUNK = 16 * 2**20  # bytes per read/write in the copy limit
TARGET_VS_COPY = 1.2
TARGET_VS_MERGEKIT = 0.5
TARGET_RSS_GROWTH = 0.10
MERGEKIT_INSTALL_TIMEOUT = 1800
# mergekit's own defaults on CPU (single-threaded executor, synchronous writes), made explicit;
# the synthetic models have no tokenizer to copy; --quiet as ours is run with --quiet.
MERGEKIT_FLAGS = ("--no-cuda", "--out-shard-size", "5B", "--no-copy-tokenizer", "--quiet")


# -- synthetic checkpoints ------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A Llama's sizes; ``params`` counts every tensor (untied embeddings)."""

    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def key(self) -> str:
        return f"llama-h{self.hidden}-i{self.intermediate}-v{self.vocab}-l{self.layers}-kv{self.kv_heads}"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order HF's Llama lists them."""
        h, i, hd = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * hd
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }


def shape_for(params: float, *, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int) -> Shape:
    """The layer count that brings a Llama of this width nearest ``params`` (at least one layer)."""
    one = Shape(hidden, intermediate, vocab, 1, heads, kv_heads).params
    zero = one - Shape(hidden, intermediate, vocab, 2, heads, kv_heads).params + one  # embeddings + final norm
    per_layer = one - zero
    layers = max(1, round((params - zero) / per_layer))
    return Shape(hidden, intermediate, vocab, layers, heads, kv_heads)


def _write_folder(folder: Path, shape: Shape, make, shard_bytes: int) -> None:
    """Write ``model*.safetensors`` (+ index) and config.json, one shard's tensors in memory at a time."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, s in shape.tensors():
        n = math.prod(s) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    shapes = dict(shape.tensors())
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, names in zip(files, shards):
        tensors = {n: make(n, shapes[n]) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del tensors
    if len(files) > 1:
        total = sum(math.prod(s) * 2 for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")


class _RankOneMoments:
    """Lazy ``name -> v`` mapping of positive rank-one second moments (what save_moments compresses)."""

    def __init__(self, shape: Shape, seed: int, names: list[str] | None = None):
        shapes = dict(shape.tensors())
        self.shapes = shapes if names is None else {n: shapes[n] for n in names}
        self.seed = seed

    def items(self):
        import torch

        g = torch.Generator().manual_seed(self.seed)
        for name, s in self.shapes.items():
            if len(s) == 1:
                yield name, torch.rand(s, generator=g).mul_(1e-8).add_(1e-10)
            else:
                r = torch.rand(s[0], generator=g).mul_(1e-4).add_(1e-6)
                c = torch.rand(math.prod(s[1:]), generator=g).mul_(1e-4).add_(1e-6)
                yield name, torch.outer(r, c).reshape(s)  # rank one: stored exactly as r, c sums


def build_checkpoints(root: Path, shape: Shape, shard_bytes: int, log) -> Path:
    """Base + experts + rank-one moments under ``root/<shape.key>``; reused when complete."""
    import torch

    from ota_trainer.moments.format import save_moments

    folder = root / shape.key
    missing = [e for e in EXPERTS if not (folder / e / "ota" / "moments.safetensors").is_file()]
    if (folder / READY).is_file() and not missing:
        log(f"reusing checkpoints {folder}")
        return folder
    if folder.exists() and not (folder / READY).is_file():
        shutil.rmtree(folder)
    fresh = not folder.exists()
    log(f"building {shape.key}: {shape.params / 1e6:.1f}M parameters x {len(missing) + fresh} models -> {folder}")
    t0 = time.perf_counter()

    def seed_of(name: str, k: int) -> int:
        return (hash_name(name) * 7 + k) % 2**62

    def base_tensor(name: str, s: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_of(name, 0))
        if len(s) == 1:
            return torch.ones(s, dtype=torch.bfloat16)
        return torch.randn(s, generator=g).mul_(BASE_STD).to(torch.bfloat16)

    if fresh:
        _write_folder(folder / "base", shape, base_tensor, shard_bytes)
    for k, expert in enumerate(EXPERTS, start=1):
        if expert not in missing:
            continue

        def expert_tensor(name: str, s: tuple[int, ...], k: int = k) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed_of(name, k))
            w = base_tensor(name, s).to(torch.float32)
            return w.add_(torch.randn(s, generator=g).mul_(NOISE_STD)).to(torch.bfloat16)

        _write_folder(folder / expert, shape, expert_tensor, shard_bytes)
        save_moments(
            folder / expert,
            _RankOneMoments(shape, seed=k),
            compression="rank1",
            metadata={"optimizer": "synthetic", "beta2": 0.999, "step": 1000},
        )
    (folder / READY).write_text(json.dumps({"shape": asdict(shape), "params": shape.params}) + "\n")
    log(f"built in {time.perf_counter() - t0:.0f}s")
    return folder


def build_adapters(ckpt: Path, shape: Shape, r: int, log) -> Path:
    """One rank-``r`` LoRA adapter of the base per expert, on ``q_proj`` and ``v_proj`` (PEFT's
    file layout; ``lora_alpha = 2r``), with rank-one moments of the weights it adapts (what a LoRA
    run with OTACallback ships), under ``ckpt/lora-r<r>/``; reused when complete."""
    import torch
    from safetensors.torch import save_file

    from ota_trainer.moments.format import save_moments

    root = ckpt / f"lora-r{r}"
    if (root / READY).is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    shapes = dict(shape.tensors())
    targets = [n for n in shapes if any(f".{t}." in n for t in LORA_TARGETS)]
    for k, expert in enumerate(EXPERTS, start=1):
        folder = root / expert
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(1000 + k)
        factors = {}
        for n in targets:
            rows, cols = shapes[n]
            module = "base_model.model." + n.removesuffix(".weight")
            factors[f"{module}.lora_A.weight"] = torch.randn(r, cols, generator=g).mul_(0.02)
            factors[f"{module}.lora_B.weight"] = torch.randn(rows, r, generator=g).mul_(0.02)
        save_file(factors, str(folder / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(LORA_TARGETS)}
        config.update(bias="none", base_model_name_or_path=str(ckpt / "base"))
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        moments = _RankOneMoments(shape, seed=k, names=targets)
        save_moments(folder, moments, compression="rank1", metadata={"optimizer": "synthetic", "beta2": 0.999})
    (root / READY).write_text("")
    log(f"built {len(EXPERTS)} rank-{r} LoRA adapters ({len(targets)} weights each) -> {root}")
    return root


def hash_name(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return [folder / "model.safetensors"]


def input_files(ckpt: Path, *, moments: bool, experts: Path | None = None) -> list[Path]:
    files = weight_files(ckpt / "base")
    for e in EXPERTS:
        files += weight_files((experts or ckpt) / e)
        if moments:
            files.append((experts or ckpt) / e / "ota" / "moments.safetensors")
    return files


def ship_histograms(ckpt: Path, log) -> Path:
    """The experts as they ship from training with OTACallback + ``save_ffg_histogram`` (what
    ``train_sft`` does after the final save): hard links to their files (the same bytes and page
    cache, no disk) plus ``ota/ffg_histogram.safetensors``, under ``ckpt/shipped/``; reused."""
    from ota_trainer import save_ffg_histogram

    root = ckpt / "shipped"
    for e in EXPERTS:
        dst = root / e
        if (dst / "ota" / "ffg_histogram.safetensors").is_file():
            continue
        if dst.exists():
            shutil.rmtree(dst)
        for src in (ckpt / e).rglob("*"):
            if src.is_file():
                (dst / src.relative_to(ckpt / e)).parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst / src.relative_to(ckpt / e))
        t = time.perf_counter()
        save_ffg_histogram(dst, ckpt / "base")
        log(f"{e}: its FFG histogram counted in {time.perf_counter() - t:.1f}s (once, at the end of its training)")
    return root


# -- measurement -----------------------------------------------------------------------------------
@dataclass
class Run:
    contender: str
    model: str
    params: int
    wall_s: float | None = None
    sync_s: float | None = None
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    peak_anon_mb: float | None = None  # polled RssAnon (heap), a lower bound on its true peak
    walls: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average when each repeat started
    error: str | None = None
    command: str = ""


def drop_caches() -> bool:
    """sync, then drop the page cache (needs root); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(files: list[Path]) -> None:
    buf = bytearray(CHUNK)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# Runs the measured command as its child and reports how it went. A small launcher is needed
# because a child forked straight from this (large) process inherits its RSS high-water mark:
# Linux folds the pre-exec memory image into the child's ru_maxrss.
LAUNCHER = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
anon = 0
while True:
    p, status, ru = os.wait4(pid, os.WNOHANG)
    if p:
        break
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = max(anon, int(line.split()[1]))
    except (OSError, ValueError):
        pass
    time.sleep(0.02)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"wall": wall, "code": os.waitstatus_to_exitcode(status), "maxrss_kb": ru.ru_maxrss,
               "cpu": ru.ru_utime + ru.ru_stime, "anon_kb": anon}, f)
"""


def measure(cmd: list[str], *, log_file: Path, env: dict | None = None) -> tuple[float, float, float, float, int]:
    """Run ``cmd``; returns (wall s, cpu s, peak RSS MB, polled peak RssAnon MB, exit code).

    Peak RSS is the command's ``ru_maxrss`` from ``wait4`` (the kernel's high-water mark),
    taken by a minimal launcher (``python -S``, ~10 MB) so that this process's memory is not counted.
    """
    result = log_file.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    with open(log_file, "w") as out:
        subprocess.run(
            [sys.executable, "-S", "-E", "-c", LAUNCHER, str(result), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            check=True,
        )
    r = json.loads(result.read_text())
    return r["wall"], r["cpu"], r["maxrss_kb"] / 1024, r["anon_kb"] / 1024, r["code"]


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


COPY_SNIPPET = r"""
import sys
out, total, chunk, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
buf = bytearray(chunk)
view = memoryview(buf)
written = 0
with open(out, "wb", buffering=0) as w:
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                if written < total:
                    k = min(n, total - written)
                    w.write(view[:k])
                    written += k
    while written < total:
        k = min(len(buf), total - written)
        w.write(view[:k])
        written += k
"""


def copy_command(target: Path, out_bytes: int, files: list[Path]) -> list[str]:
    """The copy limit: read ``files`` once and write ``out_bytes`` to ``target``."""
    return [sys.executable, "-c", COPY_SNIPPET, str(target), str(out_bytes), str(CHUNK), *map(str, files)]


PARALLEL_COPY_SNIPPET = r"""
import os, subprocess, sys
out, total, n, chunk, copy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
files = sys.argv[6:]
groups, sizes = [[] for _ in range(n)], [0] * n
for f in sorted(files, key=os.path.getsize, reverse=True):  # balanced: the largest file to the lightest group
    k = sizes.index(min(sizes))
    groups[k].append(f)
    sizes[k] += os.path.getsize(f)
os.makedirs(out)
procs = [
    subprocess.Popen([sys.executable, "-c", copy, os.path.join(out, str(k)), str(total // n), chunk, *g])
    for k, g in enumerate(groups)
]
sys.exit(max(p.wait() for p in procs))
"""


def parallel_copy_command(target: Path, out_bytes: int, files: list[Path]) -> list[str]:
    """The copy limit on every core: ``files`` split into balanced groups, one copying process per
    core, each writing its share of ``out_bytes`` into the folder ``target``."""
    n, chunk = str(os.cpu_count() or 1), str(CHUNK)
    return [
        sys.executable,
        "-c",
        PARALLEL_COPY_SNIPPET,
        str(target),
        str(out_bytes),
        n,
        chunk,
        COPY_SNIPPET,
        *map(str, files),
    ]


def merge_command(recipe: Path, out: Path) -> list[str]:
    """Our merge of ``recipe`` into ``out``: the CLI users run, or the library call without it."""
    if MERGE_CLI.is_file():
        return [sys.executable, str(MERGE_CLI), "--recipe", str(recipe), "--out", str(out), "--overwrite", "--quiet"]
    return [
        sys.executable,
        "-c",
        "import sys, ota_trainer; ota_trainer.merge(sys.argv[1], sys.argv[2], overwrite=True, quiet=True)",
        str(recipe),
        str(out),
    ]


def _default_ffg_rule() -> tuple:
    from ota_trainer.merger.recipe import DEFAULT_FFG_RULE

    return DEFAULT_FFG_RULE


OTA_RULE = {"rule": "density"}  # ota's FFG rule: "density" (DENSITY) or "default" (the library's: --ota-default)


def ota_recipe(ckpt: Path, method: str, experts: Path | None = None) -> dict:
    models = [{"model": str((experts or ckpt) / e)} for e in EXPERTS]
    params = {} if method == "ota" and OTA_RULE["rule"] == "default" else {"density": DENSITY}
    return {
        "method": method,
        "base_model": str(ckpt / "base"),
        "models": models,
        "parameters": params,
        "dtype": "bfloat16",
        "options": {"shard_size": "5GB"},
    }


def mergekit_config(ckpt: Path) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(ckpt / "base"),
        "models": [{"model": str(ckpt / e), "parameters": {"density": DENSITY, "weight": 1.0}} for e in EXPERTS],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }


# -- mergekit venv ---------------------------------------------------------------------------------
def ensure_mergekit(venv: Path, log) -> tuple[Path | None, str]:
    """The ``mergekit-yaml`` executable of ``venv`` (created and filled on first use), or None and why."""
    exe = venv / "bin" / "mergekit-yaml"
    py = venv / "bin" / "python"
    if not exe.is_file():
        log(f"creating {venv} (torch {_torch_version()} CPU first, then mergekit from PyPI)")
        try:
            if not py.is_file():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
            # a bare `pip install torch` would pull a CUDA build: install this venv's CPU build first
            # (its exact local version, e.g. 2.13.0+cpu), else the same release
            pip = [str(py), "-m", "pip", "install", "-q"]
            r = subprocess.run(
                pip + [f"torch=={_torch_version(local=True)}"],
                capture_output=True,
                text=True,
                timeout=MERGEKIT_INSTALL_TIMEOUT,
                check=False,
            )
            if r.returncode != 0:
                subprocess.run(
                    pip + [f"torch=={_torch_version()}"],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=MERGEKIT_INSTALL_TIMEOUT,
                )
            subprocess.run(
                pip + ["mergekit"], check=True, capture_output=True, text=True, timeout=MERGEKIT_INSTALL_TIMEOUT
            )
        except subprocess.CalledProcessError as e:
            return None, f"installing mergekit failed: {(e.stderr or '').strip().splitlines()[-1:] or e}"
        except subprocess.TimeoutExpired:
            return None, "installing mergekit timed out"
        if not exe.is_file():
            return None, f"mergekit installed but {exe} is missing"
    r = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return exe, r.stdout.strip() or "unknown version"


def _torch_version(*, local: bool = False) -> str:
    import torch

    return torch.__version__ if local else torch.__version__.split("+")[0]


# -- the benchmark ---------------------------------------------------------------------------------
def run_size(args, shape: Shape, label: str, mergekit: Path | None, mergekit_why: str, cache: str, log) -> list[Run]:
    """Build (or reuse) the checkpoints of one size and measure every contender on them."""
    import yaml

    ckpt = build_checkpoints(Path(args.work) / "models", shape, args.in_shard_bytes, log)
    outs = Path(args.work) / "outputs" / shape.key
    outs.mkdir(parents=True, exist_ok=True)
    logs = Path(args.work) / "logs" / shape.key
    logs.mkdir(parents=True, exist_ok=True)
    out_bytes = sum(p.stat().st_size for p in weight_files(ckpt / "base"))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(args.env)  # --env: given to every contender alike

    # ours: a first merge of these inputs (FFG's histograms counted: their cache is off), and for
    # ota also a re-merge, whose histograms come from a cache of the bench's own (filled below)
    first = dict(env, OTA_TRAINER_CACHE=str(Path(args.work) / "ota_cache"), OTA_TRAINER_FFG_CACHE="0")
    again = dict(first, OTA_TRAINER_FFG_CACHE="1")
    contenders: list[tuple[str, list[str] | None, list[Path], Path | None, str, dict]] = []
    for moments, name in ((False, "copy limit (weights)"), (True, "copy limit (weights+moments)")):
        files = input_files(ckpt, moments=moments)
        target = outs / ("copy_moments.bin" if moments else "copy.bin")
        contenders.append((name, copy_command(target, out_bytes, files), files, target, "", env))
    files = input_files(ckpt, moments=True)
    target = outs / "copy_parallel"
    contenders.append((PARALLEL_COPY, parallel_copy_command(target, out_bytes, files), files, target, "", env))
    for method in args.methods:
        recipe = logs / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump(ota_recipe(ckpt, method), sort_keys=False))
        out = outs / method
        cmd = merge_command(recipe, out)
        contenders.append((f"ours: {method}", cmd, input_files(ckpt, moments=method == "ota"), out, "", first))
        if method == "ota" and args.shipped:
            # (first: its hard links change the inputs' ctime, which the re-merge's cache keys hold)
            shipped = ship_histograms(ckpt, lambda m: log(f"[{label}] {SHIPPED}: {m}"))
            shipped_recipe = logs / "ota_shipped.yaml"
            shipped_recipe.write_text(yaml.safe_dump(ota_recipe(ckpt, method, shipped), sort_keys=False))
            files = input_files(ckpt, moments=True, experts=shipped)
            contenders.append((SHIPPED, merge_command(shipped_recipe, out), files, out, "", first))
        if method == "ota" and args.remerge:
            from ota_trainer.merger.ffg_cache import RACY_S

            files = input_files(ckpt, moments=True)
            contenders.append((REMERGE, cmd, files, out, "", again))
            log(f"[{label}] {REMERGE}: a first merge, untimed, fills its FFG histogram cache")
            newest = max(max(f.stat().st_mtime, f.stat().st_ctime) for f in files)
            time.sleep(max(0.0, newest + RACY_S + 0.5 - time.time()))  # inputs changed just now are not cached
            measure(cmd, log_file=logs / "ours_ota_remerge.prime.log", env=again)
    if args.lora:
        adapters = build_adapters(ckpt, shape, args.lora, log)
        files = weight_files(ckpt / "base")
        for e in EXPERTS:
            files += [adapters / e / "adapter_model.safetensors", adapters / e / "ota" / "moments.safetensors"]
        target = outs / "copy_lora.bin"
        contenders.append((LORA_COPY, copy_command(target, out_bytes, files), files, target, "", env))
        recipe = logs / "ota_lora.yaml"
        recipe.write_text(yaml.safe_dump(ota_recipe(ckpt, "ota", adapters), sort_keys=False))
        contenders.append((LORA, merge_command(recipe, outs / "ota_lora"), files, outs / "ota_lora", "", first))
    if args.mergekit:
        cfg = logs / "mergekit_ties.yml"
        cfg.write_text(yaml.safe_dump(mergekit_config(ckpt), sort_keys=False))
        out = outs / "mergekit_ties"
        cmd = None
        if mergekit is not None:
            cmd = [str(mergekit), str(cfg), str(out), *args.mergekit_flags]
        contenders.append(("mergekit: ties", cmd, input_files(ckpt, moments=False), out, mergekit_why, env))

    # the repeats go round the contenders (copy limit, ours, mergekit, then again): the disk's and
    # the VM's pace drift over minutes (measured: the copy limit 2.7-4.0 s in one session), and
    # round robin gives every contender the same spread of it
    runs, todo, results = [], [], {}
    for name, cmd, files, out, why, run_env in contenders:
        run = Run(name, label, shape.params, command=" ".join(cmd) if cmd else "")
        runs.append(run)
        if cmd is None:
            run.error = why
            log(f"[{label}] {name}: n/a ({why})")
        else:
            todo.append((run, cmd, files, out, run_env))
            results[name] = []
    for rep in range(args.repeat):
        for run, cmd, files, out, run_env in todo:
            name = run.contender
            if run.error is not None:
                continue
            if out is not None and out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            if cache == "cold":
                drop_caches()
            else:
                os.sync()
                warm(files)
            time.sleep(args.settle)
            slug = name.replace(": ", "_").replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
            log_file = logs / f"{slug}.{rep}.log"
            load = os.getloadavg()[0]
            wall, cpu, rss, anon, code = measure(cmd, log_file=log_file, env=run_env)
            t = time.perf_counter()
            os.sync()  # flush the output: how long it took to make the result durable is reported apart
            sync = time.perf_counter() - t
            if code != 0:
                run.error = f"exit {code}: {_tail(log_file)[-400:]}"
                log(f"[{label}] {name}: FAILED ({run.error})")
                continue
            results[name].append((wall, sync, cpu, rss, anon))
            run.load.append(round(load, 2))
            log(
                f"[{label}] {name}: {wall:.1f}s wall (+{sync:.1f}s sync), {cpu:.1f}s cpu, peak RSS {rss:.0f} MB, "
                f"anon {anon:.0f} MB (load average {load:.1f} at start)"
            )
    for run, _, _, out, _ in todo:
        if results[run.contender] and run.error is None:
            rs = results[run.contender]
            best = min(rs)  # best wall of the repeats (least disturbed), with that run's times
            run.wall_s, run.sync_s, run.cpu_s = best[:3]
            # memory: the highest of the repeats (a high-water mark; page releases vary with timing)
            run.peak_rss_mb, run.peak_anon_mb = max(r[3] for r in rs), max(r[4] for r in rs)
            run.walls = [r[0] for r in rs]
        if out is not None and out.exists() and not args.keep_outputs:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    return runs


def engine_state() -> str:
    """git HEAD, whether ota_trainer/ has uncommitted edits, and a hash of its sources (to spot edits mid-run)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted((REPO / "ota_trainer").rglob("*.py")):
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    git = ["git", "-C", str(REPO)]
    head = subprocess.run(
        git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        git + ["status", "--porcelain", "--", "ota_trainer"], capture_output=True, text=True, check=False
    ).stdout
    return (
        f"{head or 'no git'}{' + uncommitted edits' if dirty.strip() else ''}, sources sha256 {digest.hexdigest()[:12]}"
    )


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def _copy_limit_of(contender: str) -> str:
    """The copy limit a contender is measured against: the same inputs read once, an output of
    the merged model's size written."""
    if contender == LORA:
        return LORA_COPY
    return "copy limit (weights+moments)" if contender.startswith("ours: ota") else "copy limit (weights)"


def summarise(runs: list[Run], labels: list[str]) -> tuple[str, dict]:
    """The Markdown table and the verdicts."""
    by = {(r.model, r.contender): r for r in runs}
    lines = [
        (
            "| contender | model | wall s | +sync s | cpu s | peak RSS MB | peak anon MB | load avg "
            "| wall vs copy limit | wall vs mergekit TIES | cpu vs mergekit TIES |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts: dict[str, dict] = {}
    for label in labels:
        mk = by.get((label, "mergekit: ties"))
        for r in [r for r in runs if r.model == label]:
            copy = by.get((label, _copy_limit_of(r.contender)))
            vs_copy = r.wall_s / copy.wall_s if r.wall_s and copy and copy.wall_s else None
            # both sides until their output is on the disk (the copy limit leaves it in the page cache)
            durable = (
                (r.wall_s + r.sync_s) / (copy.wall_s + copy.sync_s)
                if r.wall_s and r.sync_s is not None and copy and copy.wall_s and copy.sync_s is not None
                else None
            )
            parallel = (
                by.get((label, PARALLEL_COPY)) if r.contender.startswith("ours") and r.contender != LORA else None
            )
            vs_parallel = r.wall_s / parallel.wall_s if r.wall_s and parallel and parallel.wall_s else None
            vs_mk = r.wall_s / mk.wall_s if r.wall_s and mk and mk.wall_s else None
            cpu_vs_mk = r.cpu_s / mk.cpu_s if r.cpu_s and mk and mk.cpu_s else None
            show_copy = r.contender.startswith(("ours", "mergekit"))
            cells = [
                r.contender,
                f"{label} ({r.params / 1e6:.0f}M)",
                _fmt(r.wall_s),
                _fmt(r.sync_s),
                _fmt(r.cpu_s),
                _fmt(r.peak_rss_mb, ".0f"),
                _fmt(r.peak_anon_mb, ".0f"),
                "/".join(f"{x:.1f}" for x in r.load) or "n/a",
                (_fmt(vs_copy, ".2f") + "x") if show_copy and vs_copy else "",
                (_fmt(vs_mk, ".2f") + "x") if r.contender.startswith("ours") and vs_mk else "",
                (_fmt(cpu_vs_mk, ".2f") + "x") if r.contender.startswith("ours") and cpu_vs_mk else "",
            ]
            if r.error:
                cells[2] = f"n/a: {r.error[:160]}"
            lines.append("| " + " | ".join(cells) + " |")
            if r.contender.startswith("ours"):
                verdicts.setdefault(r.contender, {})[label] = {
                    "vs_copy": vs_copy,
                    "vs_copy_ok": None if vs_copy is None else vs_copy <= TARGET_VS_COPY,
                    "vs_copy_durable": durable,
                    "vs_parallel_copy": vs_parallel,
                    "vs_mergekit": vs_mk,
                    "vs_mergekit_ok": None if vs_mk is None else vs_mk <= TARGET_VS_MERGEKIT,
                    "cpu_vs_mergekit": cpu_vs_mk,
                }
    lines.append("")
    lines.append("| target | " + " | ".join(f"{c} ({label})" for c in verdicts for label in labels) + " |")
    lines.append("|---|" + "---|" * sum(len(labels) for _ in verdicts))
    row1 = [
        f"{_verdict(verdicts[c][label]['vs_copy_ok'])} {_fmt(verdicts[c][label]['vs_copy'], '.2f')}x"
        for c in verdicts
        for label in labels
    ]
    row2 = [
        f"{_verdict(verdicts[c][label]['vs_mergekit_ok'])} {_fmt(verdicts[c][label]['vs_mergekit'], '.2f')}x"
        for c in verdicts
        for label in labels
    ]
    row_durable = [f"{_fmt(verdicts[c][label]['vs_copy_durable'], '.2f')}x" for c in verdicts for label in labels]
    lines.append(f"| wall <= {TARGET_VS_COPY}x copy limit | " + " | ".join(row1) + " |")
    lines.append("| (info) wall + flush vs copy limit + its flush | " + " | ".join(row_durable) + " |")
    row_parallel = [
        f"{_fmt(verdicts[c][label]['vs_parallel_copy'], '.2f')}x" if verdicts[c][label]["vs_parallel_copy"] else ""
        for c in verdicts
        for label in labels
    ]
    lines.append("| (info) wall vs a copy on every core | " + " | ".join(row_parallel) + " |")
    lines.append(f"| wall <= {TARGET_VS_MERGEKIT}x mergekit TIES | " + " | ".join(row2) + " |")
    growth: dict[str, dict] = {}
    if len(labels) == 2:
        lines.append("")
        lines.append(
            f"| contender | peak RSS {labels[0]} MB | peak RSS {labels[1]} MB | growth when depth doubles "
            f"| < {TARGET_RSS_GROWTH:.0%} |"
        )
        lines.append("|---|---:|---:|---:|---|")
        for c in dict.fromkeys(r.contender for r in runs):
            a, b = by.get((labels[0], c)), by.get((labels[1], c))
            g = b.peak_rss_mb / a.peak_rss_mb - 1 if a and b and a.peak_rss_mb and b.peak_rss_mb else None
            ok = None if g is None else g < TARGET_RSS_GROWTH
            growth[c] = {"growth": g, "ok": ok}
            verdict = _verdict(ok) if c.startswith("ours") else "(info)"
            lines.append(
                f"| {c} | {_fmt(a.peak_rss_mb if a else None, '.0f')} | {_fmt(b.peak_rss_mb if b else None, '.0f')} | "
                f"{'n/a' if g is None else f'{g:+.1%}'} | {verdict} |"
            )
    return "\n".join(lines), {"ratios": verdicts, "rss_growth": growth}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--params",
        type=float,
        default=None,
        help="target parameter count of the base model (default 0.5e9; 5e7 with --small)",
    )
    p.add_argument("--small", action="store_true", help="quick sanity run: ~50M parameters, width 512")
    p.add_argument(
        "--depth-multiplier", type=int, default=2, help="also run a variant with this many times the layers (1: skip)"
    )
    p.add_argument("--hidden", type=int, help="hidden size (default 1024; 512 with --small)")
    p.add_argument("--intermediate", type=int, help="MLP size (default 2816; 1408 with --small)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, help="attention heads (default hidden/64)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: heads)")
    p.add_argument("--in-shard-size", default="500MB", help="shard size of the synthetic inputs (default 500MB)")
    p.add_argument("--methods", nargs="+", default=["ota", "ties"], choices=["ota", "ties"], help="our methods to time")
    p.add_argument(
        "--experts", type=int, default=2, help="experts merged with the base (default 2; the paper merges 5)"
    )
    p.add_argument(
        "--ota-default",
        action="store_true",
        help=f"ota with the library's default FFG rule (the saliency share) instead of density {DENSITY}",
    )
    p.add_argument("--no-mergekit", dest="mergekit", action="store_false", help="skip mergekit's TIES")
    p.add_argument(
        "--no-shipped",
        dest="shipped",
        action="store_false",
        help="skip the ota first merge of experts that ship their FFG histograms (save_ffg_histogram)",
    )
    p.add_argument(
        "--no-remerge",
        dest="remerge",
        action="store_false",
        help="skip the ota re-merge (FFG's histograms from the cache a first merge filled)",
    )
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="also time ota on one rank-R LoRA adapter (q_proj, v_proj) per expert instead of its full weights",
    )
    p.add_argument("--mergekit-venv", help="venv holding mergekit (default <work>/mergekit-venv, created on first use)")
    p.add_argument(
        "--mergekit-flags",
        nargs=argparse.REMAINDER,
        default=None,
        help=f"flags for mergekit-yaml after CONFIG OUT; must come last (default: {' '.join(MERGEKIT_FLAGS)}: "
        "its defaults on CPU, no tokenizer to copy, no progress bars as for ours)",
    )
    p.add_argument(
        "--cache",
        choices=["auto", "cold", "warm"],
        default="auto",
        help="page cache before each run: cold (drop it; needs root), warm (read inputs first); auto: cold if possible",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long after preparing the page cache, before each run (0: start at once). On a VM "
        "with free page reporting (virtio-balloon), memory freed a moment ago (the dropped page cache, "
        "the last run's) is still backed by the host and cheap to reuse; after a few seconds it is handed "
        "back, and every page a run then touches first costs a host fault: the state of a VM whose memory "
        "has been idle. Every contender waits alike",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per contender; the best wall time is reported, for every contender alike",
    )
    p.add_argument(
        "--work", default=str(REPO / "bench_out"), help="cache of checkpoints, outputs and logs (default bench_out/)"
    )
    p.add_argument("--keep-outputs", action="store_true", help="keep merged outputs under <work>/outputs")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for every contender alike (e.g. MALLOC_MMAP_THRESHOLD_=...); repeatable",
    )
    p.add_argument("--json", help="also write every figure to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from ota_trainer.io.write import parse_size

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    args.in_shard_bytes = parse_size(args.in_shard_size)
    OTA_RULE["rule"] = "default" if args.ota_default else "density"
    global EXPERTS
    if not 1 <= args.experts <= 26:
        raise SystemExit("--experts: 1 to 26")
    EXPERTS = tuple(f"expert_{chr(ord('a') + k)}" for k in range(args.experts))
    bad = [e for e in args.env if "=" not in e]
    if bad:
        make_parser().error(f"--env {bad[0]!r}: expected KEY=VALUE")
    args.env = dict(e.split("=", 1) for e in args.env)
    if args.mergekit_flags is None:
        args.mergekit_flags = list(MERGEKIT_FLAGS)
    small = args.small
    params = args.params or (5e7 if small else 5e8)
    hidden = args.hidden or (512 if small else 1024)
    heads = args.heads or hidden // 64
    width = {
        "hidden": hidden,
        "intermediate": args.intermediate or (1408 if small else 2816),
        "vocab": args.vocab,
        "heads": heads,
        "kv_heads": args.kv_heads or heads,
    }
    shape = shape_for(params, **width)
    shapes = [(f"{shape.layers} layers", shape)]
    if args.depth_multiplier > 1:
        deep = Shape(**{**asdict(shape), "layers": shape.layers * args.depth_multiplier})
        shapes.append((f"{deep.layers} layers", deep))

    free = shutil.disk_usage(Path(args.work).parent if not Path(args.work).exists() else args.work).free
    need = sum(s.params * 2 * 3 * 2 for _, s in shapes)  # 3 input models + ~3 outputs at a time
    if free < need:
        log(f"warning: {free / 1e9:.1f} GB free, the run needs about {need / 1e9:.1f} GB")

    cache = args.cache
    if cache in ("auto", "cold"):
        if drop_caches():
            cache = "cold"
        elif cache == "cold":
            log("cannot drop the page cache (not root?); use --cache warm")
            return 2
        else:
            cache = "warm"
    log(f"page cache before each run: {cache}")

    mergekit, mergekit_info = None, "skipped (--no-mergekit)"
    if args.mergekit:
        venv = Path(args.mergekit_venv or Path(args.work) / "mergekit-venv")
        mergekit, mergekit_info = ensure_mergekit(venv, log)
        log(f"mergekit: {mergekit_info}" if mergekit else f"mergekit n/a: {mergekit_info}")

    import torch

    engine_before = engine_state()
    log(f"engine: {engine_before}")
    runs: list[Run] = []
    for label, s in shapes:
        runs += run_size(args, s, label, mergekit, mergekit_info, cache, log)
    labels = [label for label, _ in shapes]
    table, verdicts = summarise(runs, labels)

    engine_after = engine_state()
    engine_note = f"- engine (ota_trainer/): {engine_before}"
    if engine_after != engine_before:
        engine_note += f"; WARNING: it changed during the run (now {engine_after}): figures mix versions, run again"
        log(engine_note[2:])
    cpu = os.cpu_count()
    header = [
        (
            f"# bench_merge: {', '.join(f'{label} = {s.params / 1e6:.1f}M params' for label, s in shapes)} "
            f"(hidden {shape.hidden}, MLP {shape.intermediate}, vocab {shape.vocab}, bf16, "
            f"base + {len(EXPERTS)} experts)"
        ),
        "",
        (
            f"- page cache: {cache} before every run "
            f"({'dropped with sync + drop_caches' if cache == 'cold' else 'inputs read once first'}"
            + (f", then {args.settle:g} s idle: --settle" if args.settle else ", the run started at once")
            + "); "
            f"wall = process start to exit (best of {args.repeat} run(s) per contender); "
            "+sync = os.sync() right after (flushing the output), not in the ratios"
        ),
        "- ours: a first merge of the inputs (OTA_TRAINER_FFG_CACHE=0: FFG's histograms counted); "
        "'ota (re-merge)': the same merge again, FFG's histograms from the cache a first merge filled; "
        "'ota (shipped histograms)': a first merge of the same experts shipping their FFG histograms "
        "(save_ffg_histogram, as train_sft writes them after the final save), proved by the merge pass\n"
        "- peak RSS = the child's ru_maxrss (includes file pages it mapped), the highest of the repeats; "
        "peak anon = polled RssAnon (heap), a lower bound",
        (
            f"- machine: {cpu_description()}, {cpu} CPUs"
            + (", a VM with free page reporting (freed memory goes back to the host)" if free_page_reporting() else "")
            + f", torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}; ours via "
            f"{'scripts/merge_from_hub.py' if MERGE_CLI.is_file() else 'ota_trainer.merge'}; "
            f"mergekit {mergekit_info if mergekit or not args.mergekit else 'n/a: ' + mergekit_info}"
        ),
        (
            f"- load avg = 1-minute load average when each run started "
            f"({cpu} CPUs; other work on the machine inflates wall times)"
            + (f"; environment for every contender: {args.env}" if args.env else "")
        ),
        engine_note,
        (
            f"- ota: the library's default FFG rule {list(_default_ffg_rule())} (global FFG, rank-one moments); "
            f"density {DENSITY} for ties and mergekit ties (normalize: true, weight 1)"
            if OTA_RULE["rule"] == "default"
            else f"- density {DENSITY} for ota (global FFG, rank-one moments), ties and mergekit ties "
            "(normalize: true, weight 1)"
        ),
        "",
    ]
    commands = [
        f"- {r.contender}: `{r.command}`" for r in runs if r.model == labels[0] and not r.contender.startswith("copy")
    ]
    print("\n".join(header) + table + "\n\nCommands (first size):\n" + "\n".join(commands))
    if args.json:
        data = {
            "shapes": {label: {**asdict(s), "params": s.params} for label, s in shapes},
            "cache": cache,
            "settle_s": args.settle,
            "cpu": cpu_description(),
            "free_page_reporting": free_page_reporting(),
            "mergekit": mergekit_info,
            "engine": {"before": engine_before, "after": engine_after},
            "runs": [asdict(r) for r in runs],
            **verdicts,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
