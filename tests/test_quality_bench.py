"""The quality benchmark's parts (scripts/ota_quality): capabilities and their splits, the
scorers (the code scorer evaluates model output: only arithmetic on x may ever run), the
bootstrap statistics, and the whole pipeline in smoke mode (a tiny model, real training, real
merges, real lm-evaluation-harness)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ota_quality import choice, report, stats
from ota_quality.capabilities import CAPABILITIES, examples, general_candidates, safe_lambda, score

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cap", sorted(CAPABILITIES))
def test_splits_are_deterministic_disjoint_and_large_enough(cap):
    train = examples(cap, "train", 3000)
    dev, test = examples(cap, "dev", 150), examples(cap, "test", 150)
    assert examples(cap, "test", 150) == test and examples(cap, "train", 3000) == train
    prompts = {s: {e["prompt"] for e in rows} for s, rows in (("train", train), ("dev", dev), ("test", test))}
    assert len(prompts["dev"]) == 150 and len(prompts["test"]) == 150, "150 distinct prompts per evaluation split"
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["dev"]
    assert not prompts["dev"] & prompts["test"]
    if cap != "facts":  # a recall skill shares its facts across splits, and only its phrasings differ
        answers = {s: {e["answer"] for e in rows} for s, rows in (("train", train), ("test", test))}
        if cap != "shout":  # shout's dev/test requests have no reference answer (the constraint is scored)
            assert not answers["train"] & answers["test"], "test inputs never seen in training"


@pytest.mark.parametrize("cap", sorted(CAPABILITIES))
def test_reference_answers_score_one_and_wrong_answers_zero(cap):
    for e in examples(cap, "train", 40):
        assert score(cap, e["answer"], e["answer"]) == 1.0, e
        assert score(cap, e["answer"], "I am not sure.") == 0.0


def test_scorers_read_answers_as_a_user_would():
    assert score("arithmetic", "12 + 5 - 3 = 14", "Sure: 12 + 5 - 3 = 14 coins.") == 1.0
    assert score("arithmetic", "12 + 5 - 3 = 14", "12 + 5 - 3 = 15") == 0.0
    assert score("facts", "The capital of Kalo is Mira.", "It is MIRA.") == 1.0
    assert score("shout", "", "THE SEA IS BLUE AND WIDE.") == 1.0
    assert score("shout", "", "The sea is blue.") == 0.0 and score("shout", "", "OK") == 0.0
    assert score("code", "lambda x: x * 3 + 4", "Here: `lambda x: 4 + 3 * x`") == 1.0  # same function
    assert score("code", "lambda x: x * 3 + 4", "lambda x: x * 4 + 3") == 0.0
    assert score("extract", '{"name": "Ana Lo", "age": 31}', 'JSON: {"age": 31, "name": "Ana Lo"}') == 1.0
    assert score("extract", '{"name": "Ana Lo", "age": 31}', '{"name": "Ana Lo", "age": "31"}') == 0.0
    assert score("general", "cold", "The opposite of hot is cold.") == 1.0
    assert score("general", "cold", "coldest") == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "lambda x: __import__('os').system('true')",
        "lambda x: x.__class__",
        "lambda x: open('/etc/passwd')",
        "lambda x: [1] * 10**9",
        "lambda x: x ** 99999999",
        "lambda x: (lambda y: y)(x)",
        "lambda x, y=1: x",
        "lambda x: 10**9",
        "lambda x: 'a' * 5",
        "lambda x: x if x else 1",
        "lambda x: " + " * ".join(["x"] * 80),
    ],
)
def test_the_code_scorer_never_runs_anything_but_arithmetic_on_x(text):
    assert safe_lambda(text) is None


def test_general_candidates_are_disjoint_from_every_training_split():
    prompts = {g["prompt"] for g in general_candidates()}
    assert len(prompts) >= 200
    for cap in CAPABILITIES:
        assert not prompts & {e["prompt"] for e in examples(cap, "train", 2000)}


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_prompts():
    rng = np.random.default_rng(1)
    small = stats.mean_ci(rng.random(40) < 0.6)
    large = stats.mean_ci(rng.random(4000) < 0.6)
    assert small.lo <= small.est <= small.hi and large.lo <= large.est <= large.hi
    assert (large.hi - large.lo) < (small.hi - small.lo) / 5
    assert 0.55 < large.est < 0.65 and large.lo < 0.6 < large.hi
    assert stats.mean_ci([1, 0, 1, 1], seed=3) == stats.mean_ci([1, 0, 1, 1], seed=3)


def test_paired_bootstrap_sees_a_consistent_small_gain_that_unpaired_intervals_overlap():
    rng = np.random.default_rng(0)
    caps = ["a", "b"]
    base = {c: (rng.random(150) < 0.5).astype(float) for c in caps}
    better = {c: base[c].copy() for c in caps}
    for c in caps:  # flip 12 failures into successes: a small gain on the same prompts
        fails = np.flatnonzero(better[c] == 0)[:12]
        better[c][fails] = 1.0
    experts = {c: np.ones(150) for c in caps}
    d = stats.paired(better, base, experts)
    assert d.est == pytest.approx(12 / 150) and d.lo > 0, d
    ia, ib = stats.normalised(better, experts), stats.normalised(base, experts)
    assert ia.lo < ib.hi, "unpaired intervals overlap: only the paired test sees the gain"
    same = stats.paired(base, base, experts)
    assert same == (0.0, 0.0, 0.0) and not same.excludes_zero()


def test_normalised_score_divides_by_each_experts_own_score():
    model = {"a": [1, 1, 0, 0], "b": [1, 0, 0, 0]}
    experts = {"a": [1, 1, 1, 1], "b": [1, 1, 0, 0]}
    assert stats.normalised(model, experts).est == pytest.approx((0.5 + 0.5) / 2)
    with pytest.raises(ValueError, match="not paired"):
        stats.paired({"a": [1, 0]}, {"a": [1, 0, 1]})


def _dev_results(
    five: dict[str, dict[str, float]], pairs: dict[str, float], caps=("a", "b", "c"), n=40, shifted=(), n_pairs=None
) -> dict:
    """A seed's dev results: experts perfect on their capability; study -> capability -> share
    right on the five-way merge; study -> share right on every pair's capabilities (on ``n_pairs``
    prompts: default all ``n`` of the split). A study gets the first prompts right, or, if
    ``shifted``, the last ones."""

    def scores(share: float, study: str = "", m: int = n) -> dict:
        k = round(share * m)
        right = [1.0] * k + [0.0] * (m - k)
        return {"scores": right[::-1] if study in shifted else right}

    dev = lambda c: f"ota_{c}_dev"  # noqa: E731
    r = {"experts": {c: {dev(c): scores(1.0)} for c in caps}, "sweeps": {}, "dev_pairs": {}}
    for study, per_cap in five.items():
        r["sweeps"][study] = {dev(c): scores(per_cap[c], study) for c in caps}
    for study, share in pairs.items():
        for a, b in choice.pairs_of(caps):
            r["dev_pairs"][choice.pair_key(a, b, study)] = {dev(c): scores(share, study, n_pairs or n) for c in (a, b)}
    return r


def test_dev_choice_weighs_the_pairs_as_much_as_the_five_way_merge():
    caps = ["a", "b", "c"]
    flat = lambda x: dict.fromkeys(caps, x)  # noqa: E731
    # "narrow" wins the five-way merge by far and loses every pair; "broad" beats the paper a little on both;
    # "worse" does not beat the paper's five-way merge in seed 1, so it is not a candidate at all
    five = {"paper": flat(0.2), "narrow": flat(0.5), "broad": flat(0.3), "worse": flat(0.6)}
    seed0 = _dev_results(five, {"paper": 0.6, "narrow": 0.1, "broad": 0.7, "worse": 0.9})
    seed1 = _dev_results({**five, "worse": flat(0.2)}, {"paper": 0.6, "narrow": 0.1, "broad": 0.7, "worse": 0.9})
    results = {"seeds": {"0": seed0, "1": seed1}}
    candidates = choice.shortlist(results, ["narrow", "broad", "worse", "paper"], "paper", caps)
    assert candidates == ["paper", "narrow", "broad"]  # the paper's recipe first, then by five-way score
    assert choice.choose(results, candidates, caps) == "broad"
    j = choice.objective(seed0, "broad", caps)
    assert j.est == pytest.approx(0.5 * 0.3 + 0.5 * 0.7) and j.lo <= j.est <= j.hi
    d = choice.objective(seed0, "broad", caps, minus="paper")
    assert d.est == pytest.approx(0.5 * (0.3 - 0.2) + 0.5 * (0.7 - 0.6)) and d.lo > 0, d
    assert choice.objective(seed0, "narrow", caps, pair_weight=0.0).est == pytest.approx(0.5)
    assert choice.objective(seed0, "narrow", caps, pair_weight=1.0).est == pytest.approx(0.1)
    # the report carries every candidate's parts, and the choice's margin over the paper's recipe
    summary = report.dev_candidates(seed0, candidates, caps)
    assert list(summary) == candidates and summary["paper"]["J_minus_paper"] is None
    assert summary["narrow"]["J_minus_paper"]["hi"] < 0 < summary["broad"]["J_minus_paper"]["lo"]
    # a candidate ahead on the estimate but not by an interval above zero in every seed leaves the paper's recipe
    pairs = {"paper": 0.6, "narrow": 0.1, "broad": 0.625}
    close = _dev_results({**five, "broad": flat(0.225)}, pairs, shifted=("broad",))  # other prompts right
    margin = choice.objective(close, "broad", caps, minus="paper")
    assert margin.est > 0 >= margin.lo
    assert choice.choose({"seeds": {"0": seed0, "1": close}}, ["paper", "narrow", "broad"], caps) == "paper"
    # of the winners the best does not beat by an interval, the one with the fewest changes to the paper recipe
    twin = _dev_results({**five, "twin": flat(0.3)}, {"paper": 0.6, "narrow": 0.1, "broad": 0.7, "twin": 0.7})
    twins = {"seeds": {"0": twin, "1": twin}}
    assert choice.choose(twins, ["paper", "broad", "twin"], caps, {"broad": 2, "twin": 1}) == "twin"
    assert choice.choose(twins, ["paper", "broad", "twin"], caps, {"broad": 1, "twin": 2}) == "broad"
    assert choice.choose(twins, ["paper", "narrow", "twin"], caps, {"narrow": 1, "twin": 2}) == "twin"  # not a winner
    # a candidate that lost a seed needs no pairs in the seeds after it: "narrow" is out after seed 0
    assert choice.alive(results, candidates, caps, ["0"]) == ["paper", "broad"]
    assert choice.alive(results, candidates, caps, []) == candidates
    for key in [k for k in seed1["dev_pairs"] if k.endswith("/narrow")]:
        del seed1["dev_pairs"][key]
    assert choice.choose(results, candidates, caps) == "broad"
    # ... nor in a third seed: what it reached was judged, not what it never got
    assert choice.alive(results, candidates, caps, ["0", "1"]) == ["paper", "broad"]
    # nothing is chosen, nor shortlisted, before every merge it needs is evaluated
    del seed1["dev_pairs"][choice.pair_key("a", "c", "broad")]
    assert choice.objective(seed1, "broad", caps) is None and choice.choose(results, candidates, caps) is None
    del seed1["sweeps"]["worse"]
    assert choice.shortlist(results, ["narrow", "broad", "worse"], "paper", caps) is None


def _bench(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_quality.py"), *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory) -> Path:
    """One smoke run; its cached experts, merges and evaluations serve the tests after it."""
    out = tmp_path_factory.mktemp("quality")
    _bench("--smoke", "--out", str(out))
    return out


def test_smoke_pipeline_trains_merges_and_evaluates_through_lm_eval(smoke_out):
    out = smoke_out / "smoke"
    data = json.loads((out / "results.json").read_text())
    five = data["results"]["seeds"]["0"]["five"]
    assert set(five) >= {"ota", "ties", "linear"}
    for res in five.values():
        assert all(len(res[f"ota_{c}_test"]["scores"]) == 6 for c in CAPABILITIES)
        assert res["kl"] >= 0
    assert "ota minus each method" in (out / "results.md").read_text()
    assert data["summary"]["seeds"]["0"]["ota_vs"]
    assert not data["results"]["seeds"]["0"]["scale"], "the scale study runs only when asked"


def test_smoke_scale_study_trains_variants_with_overrides_and_merges_them_on_dev(smoke_out):
    out = smoke_out / "smoke"
    # evaluated merges keep their sha256, not their weights; one whose evaluation is gone is made again
    pruned = sorted((out / "merges").rglob("bench_quality_pruned.json"))
    assert len(pruned) >= 3 and not list((out / "merges").rglob("*.safetensors"))
    evals = json.loads((out / "evals.json").read_text())
    before = evals.pop("seed0/five/ota")
    (out / "evals.json").write_text(json.dumps(evals))
    r = _bench("--smoke", "--scale-study", "--out", str(smoke_out))
    assert "train seed 0 arithmetic ..." not in r.stdout, "the recipe experts stay cached"
    again = json.loads((out / "evals.json").read_text())["seed0/five/ota"]
    assert again == before, "the same merge again, the same evaluation"
    assert not list((out / "merges").rglob("*.safetensors"))

    def trained(name: str) -> dict:
        return yaml.safe_load((out / "experts" / "seed0" / name / "ota_train_config.yaml").read_text())["sft"]

    recipe = yaml.safe_load((ROOT / "sft_configs" / "quality" / "smollm2_cpu_arithmetic.yaml").read_text())["sft"]
    assert trained("arithmetic@lr2x")["learning_rate"] == 2 * recipe["learning_rate"]  # a float, not "3e-4"
    assert trained("shout@clip0.1")["max_grad_norm"] == 0.1 and "max_grad_norm" not in trained("shout")
    data = json.loads((out / "results.json").read_text())
    scale = data["results"]["seeds"]["0"]["scale"]
    methods = ("ota", "ota_mean", "ties", "task_arithmetic")
    assert set(scale) == {
        *(f"{study}/{m}" for study in ("reference", "mixed") for m in methods),
        *(f"lr_pair/{m}" for m in ("ota", "ota_mean", "linear", "ties")),
        "expert/arithmetic@lr2x",
        "expert/shout@clip0.1",
    }
    for key, res in scale.items():
        caps = (
            CAPABILITIES if key.startswith(("mixed/", "reference/")) else ["shout" if "shout" in key else "arithmetic"]
        )
        assert set(res) == {f"ota_{c}_dev" for c in caps}, key
        assert all(len(t["scores"]) == 6 for t in res.values())
    summary = data["summary"]["seeds"]["0"]["scale"]
    assert "minus_reference" in summary["mixed/ota"] and "accuracy" in summary["lr_pair/ota"]
    versus = data["summary"]["seeds"]["0"]["scale_versus"]
    assert set(versus) == {
        *(f"mixed: ota − {m}" for m in ("ota_mean", "task_arithmetic", "ties")),
        *(f"lr_pair: ota − {m}" for m in ("linear", "ota_mean", "ties")),
    }
    assert all(d["lo"] <= d["hi"] for d in versus.values())
    md = (out / "results.md").read_text()
    assert "Scale study (dev split)" in md and "| lr_pair: ota − ties |" in md


def test_task_manager_indexes_lm_evals_own_tasks_only_when_a_requested_task_needs_them(tmp_path):
    """Our local tasks alone skip indexing lm_eval's thousands of built-in ones (6-12 s per
    evaluation); a built-in task in the list brings them in (scripts/evaluate.py --tasks ... hellaswag)."""
    from ota_quality.lm_tasks import task_manager, task_name, write_tasks

    cap = next(iter(CAPABILITIES))
    write_tasks(tmp_path, {(cap, "test"): examples(cap, "test", 4)})
    ours = [task_name(cap, "test")]
    local = task_manager(tmp_path, ours)
    assert set(ours) <= set(local.all_tasks) and "hellaswag" not in local.all_tasks
    both = task_manager(tmp_path, ours + ["hellaswag"])
    assert set(ours) | {"hellaswag"} <= set(both.all_tasks)


def test_shared_prefix_layout_moves_each_rows_own_tokens_after_the_common_head():
    import torch
    from ota_quality.prefix_lm import MIN_PREFIX, shared_prefix_layout

    head = list(range(10, 10 + MIN_PREFIX + 2))
    rows = [head + [1, 2, 3], head + [4], head + [5, 6]]
    width = max(map(len, rows)) + 1  # one more column of padding than needed
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width) >= torch.tensor([[width - len(r)] for r in rows])).long()
    prefix, new_ids, new_mask = shared_prefix_layout(ids, mask, pad_id=0)
    assert prefix.tolist() == head
    for row, got, m in zip(rows, new_ids.tolist(), new_mask.tolist()):
        own = row[len(head) :]
        assert got[: len(head)] == head and got[width - len(own) :] == own
        assert [t for t, keep in zip(got, m) if keep] == row  # the same tokens, in order
    # every row keeps one own token: identical prompts share all but their last token
    same = shared_prefix_layout(ids[:1].repeat(2, 1), mask[:1].repeat(2, 1), pad_id=0)
    assert len(same[0]) == len(rows[0]) - 1
    short = torch.tensor([[1] * (MIN_PREFIX - 1) + [2], [1] * (MIN_PREFIX - 1) + [3]])
    assert shared_prefix_layout(short, torch.ones_like(short), pad_id=0) is None


def _sharp_tiny_chat_batch(tmp_path, n: int):
    """A tiny random chat model with weights 20x the init scale (attention sharp enough for each
    token's position to matter, and for rows to say different things), its tokenizer (left
    padding), and a batch of ``n`` chat prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from ota_trainer.testing.tiny import make_tiny_base, make_tiny_tokenizer

    base = make_tiny_base(tmp_path / "base", seed=3, layers=2, vocab=128)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
    model.save_pretrained(base)
    tok = make_tiny_tokenizer(base)
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": e["prompt"]}], tokenize=False, add_generation_prompt=True)
        for e in examples("shout", "test", n)
    ]
    return base, tok, tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_shared_prefix_generation_gives_lm_evals_own_tokens(tmp_path):
    """The batch's shared head computed once (ota_quality.prefix_lm) generates the same tokens as
    lm_eval's HF model, directly and through a whole evaluation of our tasks."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from ota_quality.lm_tasks import evaluate, task_name, write_tasks
    from ota_quality.prefix_lm import SharedPrefixHFLM, shared_prefix_layout

    base, tok, enc = _sharp_tiny_chat_batch(tmp_path, 6)
    assert shared_prefix_layout(enc["input_ids"], enc["attention_mask"], tok.pad_token_id) is not None
    kw = dict(max_length=enc["input_ids"].shape[1] + 12, stop=["\n\n"], do_sample=False)
    args = dict(pretrained=str(base), dtype="float32", device="cpu", batch_size=6)
    ours = SharedPrefixHFLM(**args)._model_generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    theirs = HFLM(**args)._model_generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    assert torch.equal(ours, theirs)

    caps = ["shout", "facts"]
    write_tasks(tmp_path / "tasks", {(c, "test"): examples(c, "test", 8) for c in caps})
    tasks = [task_name(c, "test") for c in caps]
    runs = [
        evaluate(base, tasks, include_path=tmp_path / "tasks", batch_size=8, shared_prefix=s) for s in (True, False)
    ]
    assert runs[0] == runs[1]


def test_greedy_generation_that_drops_finished_rows_gives_lm_evals_responses(tmp_path):
    """Rows that finished (an end-of-sequence token, or a stop string in what lm_eval decodes) are
    dropped and the others go on from their cache (ota_quality.prefix_lm): every response lm_eval
    makes of it is the one its own single ``generate`` call gives, and each row's tokens up to
    where it finished are the same."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import postprocess_generated_text
    from ota_quality.prefix_lm import SharedPrefixHFLM

    base, tok, enc = _sharp_tiny_chat_batch(tmp_path, 12)
    width = enc["input_ids"].shape[1]
    stop = ["$", "Ma", "\n\n", "<|im_end|>"]  # one character, two (split over tokens), lm_eval's two
    kw = dict(max_length=width + 24, stop=stop, do_sample=False)
    args = dict(pretrained=str(base), dtype="float32", device="cpu", batch_size=12)
    lm = SharedPrefixHFLM(**args)
    ours = lm._model_generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    theirs = HFLM(**args)._model_generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    assert len(lm.last_batches) >= 3 and lm.last_batches == sorted(lm.last_batches, reverse=True)

    def response(row):  # as lm_eval's generate_until makes it
        return postprocess_generated_text(lm.tok_decode(row[width:].tolist()), stop, None)

    early = 0
    for a, b in zip(ours, theirs):
        assert response(a) == response(b)
        n = int((a[width:] != tok.pad_token_id).sum())  # a row's own tokens: the padding after it finished
        assert torch.equal(a[: width + n], b[: width + n])
        early += n < 24
    assert 0 < early < len(ours), "rows that finished early and rows that ran to the end"


def test_dev_pairs_count_only_on_the_dev_split_the_five_way_merge_was_scored_on():
    caps = ["a", "b", "c"]
    flat = lambda x: dict.fromkeys(caps, x)  # noqa: E731
    seed = _dev_results({"paper": flat(0.25), "x": flat(0.5)}, {"paper": 0.5, "x": 0.8})
    assert choice.objective(seed, "x", caps).est == pytest.approx(0.5 * 0.5 + 0.5 * 0.8)
    # pairs scored on other prompts (a dev split of another size) are not pairs of this split
    other = _dev_results({"paper": flat(0.25)}, {"paper": 0.5}, n_pairs=20)
    assert choice.objective(other, "paper", caps) is None


def test_growing_kv_cache_holds_what_concatenation_holds_without_a_copy_per_step():
    """GrowingLayer (ota_quality.prefix_lm) returns the keys and values DynamicLayer's torch.cat
    gives, through the shared head's batch repeat, the finished rows dropped and past its first
    capacity, and reallocates its buffer only then and when it is full."""
    import torch
    from ota_quality.prefix_lm import GrowingLayer
    from transformers.cache_utils import DynamicLayer

    g = torch.Generator().manual_seed(0)
    ours, theirs = GrowingLayer(), DynamicLayer()
    buffers = set()
    steps = [(1, 9), "repeat", (3, 5), *[(3, 1)] * 40, "select", *[(2, 1)] * 30]  # 84 positions: past 64
    for step in steps:
        if step == "repeat":
            for layer in (ours, theirs):
                layer.batch_repeat_interleave(3)
            continue
        if step == "select":  # the rows that finished dropped: rows 0 and 2 go on
            for layer in (ours, theirs):
                layer.batch_select_indices(torch.tensor([0, 2]))
            assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
            continue
        batch, new = step
        k, v = (torch.randn(batch, 2, new, 4, generator=g) for _ in range(2))
        got, want = ours.update(k, v), theirs.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert ours.get_seq_length() == theirs.get_seq_length()
        buffers.add(ours.keys.data_ptr())
    assert len(buffers) <= 4, "a new buffer for the head, the repeated batch, the rows kept, and when it doubles"


def test_the_same_weights_on_the_same_tasks_are_evaluated_once_whatever_their_label(smoke_out, tmp_path):
    """Evaluator caches by the weights' sha256 and the tasks: another label for the same merge (ota's
    default and the dev choice it came from) gets the cached evaluation; other tasks do not."""
    import shutil

    from ota_quality.evaluation import Evaluator
    from ota_quality.lm_tasks import task_name

    base = smoke_out / "cache" / "tiny-base"
    a, b = (task_name(c, "test") for c in sorted(CAPABILITIES)[:2])
    shutil.copytree(smoke_out / "smoke" / "tasks", tmp_path / "tasks")
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)  # the same weights in another folder,
    (copy / "config.json").unlink()  # which no evaluation could load
    ev = Evaluator(tmp_path, base, batch_size=4)
    first = ev.evaluate("default", base, [a], kl=False, general=False)
    evaluations = json.loads((tmp_path / "evals.json").read_text())
    assert ev.evaluate("dev choice", copy, [a], kl=False, general=False) == first
    assert ev.cached("dev choice", copy, [a], kl=False, general=False)
    assert not ev.cached("other tasks", copy, [b], kl=False, general=False)
    cached = json.loads((tmp_path / "evals.json").read_text())
    assert cached["dev choice"]["result"] == first and set(cached) == {*evaluations, "dev choice"}
