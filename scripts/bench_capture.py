#!/usr/bin/env python
"""Benchmark what OTACallback costs a training run: capture time, extra memory, moments size.

For each model (random Llama weights in fp32, as a CPU fine-tune holds them), runs a few real
AdamW training steps (forward + backward + ``optimizer.step()``) so the optimizer holds a real
``exp_avg_sq``, then measures, with the optimizer state in place:

* one optimizer step (the median of the measured steps, forward + backward + step; and the
  ``optimizer.step()`` alone);
* ``save_optimizer_moments`` (what the callback runs at every save: read ``exp_avg_sq``,
  compress, write ``ota/moments.safetensors``), for ``rank1`` and ``full``: wall time, and the
  extra peak RSS above the training process's own high-water mark (``VmHWM`` reset through
  ``/proc/self/clear_refs`` before each capture);
* the moments file size against the weights saved by ``save_pretrained`` (fp32) and the same
  weights in bf16 (how experts are usually published);
* the FFG histogram ``OTACallback`` ships at the end of training (counted from the weights in
  memory against the base's files, saved before the steps, and the rank-one moments): wall time
  and extra peak RSS.

Targets (issue #4): rank-one moments <= 0.5% of the weights on SmolLM2-sized shapes.
Figures only: this is not a test.

    # SmolLM2-135M and SmolLM2-360M shapes (~6 minutes on 2 cores)
    .venv/bin/python scripts/bench_capture.py

    # one model, more steps, JSON beside the table
    .venv/bin/python scripts/bench_capture.py --models smollm2-360m --steps 5 --json bench_out/capture.json

Nothing is downloaded: the models are built from configs with random weights (the shapes are
what matters for time, memory and size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Llama shapes of the SmolLM2 family (config.json of HuggingFaceTB/SmolLM2-*), tied embeddings.
MODELS = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    ),
    "smollm2-360m": dict(
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        vocab_size=49152,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),  # a seconds-long check that the script runs
}
DEFAULT_MODELS = ("smollm2-135m", "smollm2-360m")
TARGET_RANK1_SHARE = 0.005


def _rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def build(name: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **MODELS[name],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        head_dim=MODELS[name]["hidden_size"] // MODELS[name]["num_attention_heads"],
    )
    return LlamaForCausalLM(cfg).float()


def bench_model(name: str, *, steps: int, batch: int, seq: int, work: Path, seed: int, log) -> dict:
    import torch

    from ota_trainer.capture import save_optimizer_moments
    from ota_trainer.moments.format import MOMENTS_DIR, MOMENTS_FILE

    model = build(name, seed)
    n_params = sum(p.numel() for p in model.parameters())
    base = work / f"{name}-base"  # the weights training starts from: what the FFG histogram is counted against
    shutil.rmtree(base, ignore_errors=True)
    model.save_pretrained(base)
    log(f"[{name}] {n_params / 1e6:.1f}M parameters (fp32), batch {batch}x{seq}, {steps} AdamW steps")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(seed)
    step_s, opt_s = [], []
    for i in range(steps + 1):  # the first step allocates the optimizer state: not timed
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i:
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
        log(f"[{name}] step {i}: {t2 - t0:.2f}s (optimizer.step {t2 - t1:.2f}s), loss {loss.item():.3f}")
    del loss
    row = {
        "model": name,
        "params": n_params,
        "batch": f"{batch}x{seq}",
        "steps": steps,
        "step_s": statistics.median(step_s),
        "optimizer_step_s": statistics.median(opt_s),
        "train_rss_mb": _rss_mb(),
    }

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)  # fp32 weights, as the Trainer saves this run's model
    row["weights_fp32_bytes"] = _folder_bytes(out, "*.safetensors")
    row["weights_bf16_bytes"] = row["weights_fp32_bytes"] // 2
    for compression in ("rank1", "full"):
        shutil.rmtree(out / MOMENTS_DIR, ignore_errors=True)
        path, wall, extra, exact = _timed(
            save_optimizer_moments, out, model, opt, compression=compression, metadata={"base_model": f"bench/{name}"}
        )
        assert path == out / MOMENTS_DIR / MOMENTS_FILE, path
        size = path.stat().st_size
        row[compression] = {
            "capture_s": wall,
            "vs_step": wall / row["step_s"],
            "extra_peak_mb": extra,
            "peak_exact": exact,
            "bytes": size,
            "vs_fp32_weights": size / row["weights_fp32_bytes"],
            "vs_bf16_weights": size / row["weights_bf16_bytes"],
        }
        log(
            f"[{name}] {compression}: {wall:.2f}s, +{row[compression]['extra_peak_mb']:.0f} MB peak, "
            f"{size / 2**20:.2f} MB ({row[compression]['vs_fp32_weights']:.3%} of fp32 weights)"
        )
        if compression == "rank1":
            row["histogram"] = _time_histogram(model, out, base)
            h = row["histogram"]
            log(
                f"[{name}] FFG histogram (OTACallback, end of training): {h['s']:.2f}s, "
                f"+{h['extra_peak_mb']:.0f} MB peak"
            )
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    return row


def _time_histogram(model, out: Path, base: Path) -> dict:
    """What OTACallback adds at the end of training: the expert's FFG histogram, counted from the
    weights in memory against the base's files (page cache warm: it was just written) and the
    rank-one moments just saved."""
    from ota_trainer.capture import trainable_weights
    from ota_trainer.merger.ffg_shipped import ship_histogram_of_weights

    _, wall, extra, _ = _timed(ship_histogram_of_weights, out, base, trainable_weights(model))
    return {"s": wall, "extra_peak_mb": extra}


def _timed(fn, *args, **kw):
    """``fn(*args, **kw)``'s result, wall time, and the peak RSS it added above this process's
    (``VmHWM`` reset first when the kernel allows: then exact), and whether that was exact."""
    exact = _reset_peak()
    before, hwm_before = _rss_mb(), _status_kb("VmHWM") / 1024
    t0 = time.perf_counter()
    result = fn(*args, **kw)
    wall = time.perf_counter() - t0
    return result, wall, _status_kb("VmHWM") / 1024 - (before if exact else hwm_before), exact


LORA_TARGETS = ("q_proj", "v_proj")
TARGET_EXACT, TARGET_FACTORED = 0.35, 0.05  # extra share of a LoRA step (issue #17)


def _lora_run(name: str, *, estimators: tuple[str, ...], steps: int, batch: int, seq: int, seed: int, log):
    """A LoRA run (r=16 on q_proj and v_proj, AdamW on the adapter) with the given estimators'
    hooks installed: the median step time (forward + backward + the estimators' step +
    optimizer step), the extra peak RSS over the untimed first step, and the estimators."""
    import peft
    import torch

    from ota_trainer.capture.lora import LoraCurvature

    model = peft.get_peft_model(
        build(name, seed), peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS))
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    curv = [LoraCurvature(model, 0.999, estimator=e) for e in estimators]
    g = torch.Generator().manual_seed(seed)
    times, peak0 = [], None
    for i in range(steps + 1):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        if i == 1:
            exact_peak = _reset_peak()
            peak0 = _rss_mb() if exact_peak else _status_kb("VmHWM") / 1024
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        for c in curv:
            c.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    extra = _status_kb("VmHWM") / 1024 - peak0
    label = "+".join(estimators) or "off"
    log(f"[{name} LoRA {label}] step {statistics.median(times):.3f}s, +{extra:.0f} MB peak")
    return {"step_s": statistics.median(times), "extra_peak_mb": extra}, model, curv


def lora_agreement(model, exact, factored, density: float = 0.4) -> dict:
    """How the factored estimate agrees with the exact one on the same run: Pearson correlation
    of the rank-one second moments (all adapted entries; and of their logs), and the Jaccard
    index of the FFG masks (top ``density`` of v * d^2 over all adapted entries, d = scale B A)."""
    import torch

    deltas = {}
    for mod_name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            key = mod_name.removeprefix("base_model.model.") + ".weight"
            deltas[key] = (
                module.get_delta_weight(
                    module.active_adapter[0] if isinstance(module.active_adapter, list) else module.active_adapter
                )
                .detach()
                .float()
            )

    def v_of(curv):
        out = {}
        for layer in curv.layers:
            r, c = layer.row.float(), layer.col.float()
            out[layer.name] = torch.outer(r, c) / r.sum().clamp_min(1e-30)
        return out

    ve, vf = v_of(exact), v_of(factored)
    names = sorted(ve)
    a = torch.cat([ve[n].reshape(-1) for n in names]).double()
    b = torch.cat([vf[n].reshape(-1) for n in names]).double()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    tiny = 1e-30
    corr_log = float(torch.corrcoef(torch.stack([(a + tiny).log(), (b + tiny).log()]))[0, 1])
    d2 = torch.cat([deltas[n].reshape(-1) ** 2 for n in names]).double()
    k = int(density * a.numel())
    me = torch.zeros_like(a, dtype=torch.bool)
    mf = torch.zeros_like(a, dtype=torch.bool)
    me[torch.topk(a * d2, k).indices] = True
    mf[torch.topk(b * d2, k).indices] = True
    jaccard = float((me & mf).sum() / (me | mf).sum())
    return {"corr": corr, "corr_log": corr_log, "jaccard": jaccard}


def bench_lora(name: str, *, steps: int, batch: int, seq: int, work: Path, seed: int, log) -> dict:
    """LoRA step time with capture off / factored / exact, extra peak memory, file size, and the
    factored estimate's agreement with the exact one."""
    from ota_trainer.moments.format import save_moments

    row = {"model": name}
    # interleaved, twice each: the faster run counts (the first runs of a process pay for warming up)
    for estimators in ((), ("factored",), ("exact",)) * 2:
        label = estimators[0] if estimators else "off"
        got, model, curv = _lora_run(name, estimators=estimators, steps=steps, batch=batch, seq=seq, seed=seed, log=log)
        if label not in row or got["step_s"] < row[label]["step_s"]:
            row[label] = {**row.get(label, {}), **got}
        if curv:
            out = work / f"{name}-{label}"
            path = save_moments(out, curv[0].factors(), compression="rank1", metadata={"step": curv[0].steps})
            row[label]["bytes"] = path.stat().st_size
            shutil.rmtree(out, ignore_errors=True)
            curv[0].remove()
        del model
    for label in ("factored", "exact"):
        row[label]["vs_off"] = row[label]["step_s"] / row["off"]["step_s"] - 1
        row[label]["extra_vs_off_mb"] = row[label]["extra_peak_mb"] - row["off"]["extra_peak_mb"]
    _, model, (exact, factored) = _lora_run(
        name, estimators=("exact", "factored"), steps=steps, batch=batch, seq=seq, seed=seed, log=log
    )
    row["agreement"] = lora_agreement(model, exact, factored)
    return row


def lora_table(rows: list[dict]) -> str:
    lines = [
        "| model | LoRA step s (capture off) | factored: step s, extra | exact: step s, extra "
        "| peak MB vs off (factored / exact) | moments file MB | factored vs exact: corr (log) | FFG Jaccard @0.4 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, e, a = r["factored"], r["exact"], r["agreement"]
        lines.append(
            f"| {r['model']} | {r['off']['step_s']:.3f} | {f['step_s']:.3f}, {f['vs_off']:+.1%} | {e['step_s']:.3f}, "
            f"{e['vs_off']:+.1%} | {f['extra_vs_off_mb']:+.0f} / {e['extra_vs_off_mb']:+.0f} "
            f"| {e['bytes'] / 2**20:.3f} "
            f"| {a['corr']:.3f} ({a['corr_log']:.3f}) | {a['jaccard']:.3f} |"
        )
    for r in rows:
        for label, target in (("exact", TARGET_EXACT), ("factored", TARGET_FACTORED)):
            ok = "PASS" if r[label]["vs_off"] <= target else "FAIL"
            extra = r[label]["vs_off"]
            lines.append(
                f"- {r['model']}: {label} capture {extra:+.1%} of a LoRA step vs target <= +{target:.0%}: {ok}"
            )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params | one training step s (opt.step s) | moments | capture+compress+save s | vs one step "
        "| extra peak RSS MB | file MB | vs fp32 weights | vs bf16 weights |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for c in ("rank1", "full"):
            m = r[c]
            lines.append(
                f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['step_s']:.2f} ({r['optimizer_step_s']:.2f}) | {c} "
                f"| {m['capture_s']:.2f} | {m['vs_step']:.2f}x | {m['extra_peak_mb']:.0f} | {m['bytes'] / 2**20:.2f} "
                f"| {m['vs_fp32_weights']:.3%} | {m['vs_bf16_weights']:.3%} |"
            )
    lines += [
        "",
        "| model | FFG histogram at the end of training s | vs one step | extra peak RSS MB |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        h = r["histogram"]
        lines.append(f"| {r['model']} | {h['s']:.2f} | {h['s'] / r['step_s']:.2f}x | {h['extra_peak_mb']:.0f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        share = r["rank1"]["vs_fp32_weights"]
        ok = "PASS" if share <= TARGET_RANK1_SHARE else "FAIL"
        out.append(
            f"- {r['model']}: rank-one moments {share:.3%} of the fp32 weights "
            f"({r['rank1']['vs_bf16_weights']:.3%} of bf16) vs target <= {TARGET_RANK1_SHARE:.1%}: {ok}"
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per model (after one untimed)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora", action="store_true", help="LoRA capture instead: step time off / factored / exact")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    bench, title = (bench_lora, "bench_capture --lora") if args.lora else (bench_model, "bench_capture")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for name in args.models:
            rows.append(
                bench(name, steps=args.steps, batch=args.batch, seq=args.seq, work=Path(tmp), seed=args.seed, log=log)
            )
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{title}: {time.strftime('%Y-%m-%d')}, {cpu_description()}, torch {torch.__version__}, "
        f"{args.threads} threads, load average {load} at the end\n"
    )
    if args.lora:
        print(lora_table(rows))
    else:
        print(table(rows))
        print()
        print("\n".join(verdicts(rows)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
