"""OTACallback when a run is killed (issue #13, items 8 and 9), with the real Trainer on tiny models.

* checkpoint moments are staged outside ``checkpoint-N/`` until the Trainer has saved that
  checkpoint, so a kill in between leaves no half-made checkpoint and resuming works;
* the metadata says which weights the moments belong to (``global_step``, ``captured_at``,
  ``written_before_weights``, ``load_best_model_at_end``), checked here with the rule the
  merger applies (:func:`pairing_problems`);
* a killed writer leaves no spool file, and ``.tmp-<PID>`` / ``.spool-<PID>`` files of dead
  processes are removed by the next save in that folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from dist_scripts._common import tiny_dataset, tiny_model
from test_capture import (
    _stepped_adamw,
    assert_moments_match,
    expected_state,
    make_trainer,
    real_optimizer,
    saved_weight_names,
    shapes_of,
)
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from ota_trainer.capture import (
    OTACallback,
    align_moments_to_weights,
    check_moments_cover_weights,
    save_optimizer_moments,
)
from ota_trainer.capture.callback import STAGING_DIR, _copy_moments
from ota_trainer.errors import NumericalError
from ota_trainer.moments.format import convert_moments, load_moments, moments_path, save_moments

TESTS = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def pairing_problems(folder) -> list[str]:
    """What the merger says of a folder's moments and weights belonging together
    (:func:`ota_trainer.merger.inputs.check_moments_belong`): [] or its error message."""
    from ota_trainer.errors import IncompatibleModelsError
    from ota_trainer.merger.inputs import check_moments_belong, open_model, open_moments

    model = open_model(folder)
    try:
        check_moments_belong(model, open_moments(model))
    except IncompatibleModelsError as e:
        return [str(e)]
    return []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    return proc.pid


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or ".spool-" in p.name)


def run_script(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


KILLED_RUN = """
    import os, sys
    from dist_scripts._common import tiny_dataset, tiny_model
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from ota_trainer.capture import OTACallback

    class Kill(TrainerCallback):  # registered after OTACallback: its on_step_end has run
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                assert control.should_save
                os._exit(1)  # killed after the capture, before the Trainer saves checkpoint-4

    args = TrainingArguments(
        sys.argv[1], max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True, bf16=False,
        report_to=[], save_strategy="steps", save_steps=2, logging_steps=100, disable_tqdm=True, seed=0,
    )
    callbacks = [OTACallback("full"), Kill()]
    Trainer(model=tiny_model(), args=args, train_dataset=tiny_dataset(), callbacks=callbacks).train()
"""


# ----------------------------------------------------------------------------------------
# 1. a kill between the capture and the Trainer's save of the checkpoint
# ----------------------------------------------------------------------------------------


def test_kill_before_the_checkpoint_is_saved_leaves_no_half_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "out"
    proc = run_script(KILLED_RUN, str(out), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]

    # no checkpoint-4/ at all: the moments of step 4 wait in the staging folder
    assert not (out / "checkpoint-4").exists()
    assert moments_path(out / STAGING_DIR / ".checkpoint-4").is_file()
    assert leftovers(out) == []
    # checkpoint-2 is complete, with its moments; the Trainer's discovery sees only real checkpoints
    ckpt2 = out / "checkpoint-2"
    assert {"model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt"} <= {
        p.name for p in ckpt2.iterdir()
    }
    assert check_moments_cover_weights(ckpt2) == [] and pairing_problems(ckpt2) == []
    assert get_last_checkpoint(str(out)) == str(ckpt2)
    assert sort_checkpoints(str(out)) == [str(ckpt2)]
    # neither of the Trainer's uploads of output_dir nor push_expert would take the staged file
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    from ota_trainer.hub import EXPERT_IGNORE

    staged = [str(p.relative_to(out)) for p in (out / STAGING_DIR).rglob("*") if p.is_file()]
    assert staged == [f"{STAGING_DIR}/.checkpoint-4/ota/moments.safetensors"]
    import inspect

    from transformers import Trainer

    trainer_patterns = ["_*", "checkpoint-*"]  # Trainer.push_to_hub / _push_from_checkpoint's uploads of output_dir
    for upload in (Trainer.push_to_hub, Trainer._push_from_checkpoint):
        assert 'ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"]' in inspect.getsource(upload)
    assert list(filter_repo_objects(staged, ignore_patterns=trainer_patterns + DEFAULT_IGNORE_PATTERNS)) == []
    assert list(filter_repo_objects(staged, ignore_patterns=EXPERT_IGNORE)) == []

    # resume: the stale staging folder is dropped, training finishes with moments everywhere
    resumed = make_trainer(out, callback=OTACallback("full"), max_steps=6, save_steps=2)
    seen = {}

    class Look(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.setdefault("staging", (out / STAGING_DIR).exists())

    resumed.add_callback(Look())
    resumed.train(resume_from_checkpoint=True)
    resumed.save_model()
    assert seen == {"staging": False}
    assert not (out / STAGING_DIR).exists() and leftovers(out) == []
    shapes = shapes_of(resumed.model)
    for step in (4, 6):
        ckpt = out / f"checkpoint-{step}"
        assert_moments_match(ckpt, resumed.ota_snapshot.at_save[step], compression="full", shapes=shapes)
        assert load_moments(ckpt).metadata["global_step"] == step
        assert check_moments_cover_weights(ckpt) == [] and pairing_problems(ckpt) == []
    assert_moments_match(out, expected_state(real_optimizer(resumed), resumed.model), compression="full", shapes=shapes)
    assert load_moments(out).metadata["global_step"] == 6 and pairing_problems(out) == []


def test_moments_appear_in_the_checkpoint_only_after_the_trainer_saved_it(tmp_path):
    """Between on_step_end and on_save the checkpoint folder does not exist yet (no push)."""
    out = tmp_path / "out"
    trainer = make_trainer(out, callback=OTACallback("rank1"), max_steps=4, save_steps=2)
    seen = {}

    class Look(TrainerCallback):  # after OTACallback
        def on_step_end(self, args, state, control, **kw):
            if control.should_save:
                seen[state.global_step] = (
                    (out / f"checkpoint-{state.global_step}").exists(),
                    moments_path(out / STAGING_DIR / f".checkpoint-{state.global_step}").is_file(),
                )

        def on_save(self, args, state, control, **kw):
            seen[f"saved-{state.global_step}"] = (
                moments_path(out / f"checkpoint-{state.global_step}").is_file(),
                (out / STAGING_DIR).exists(),
            )

    trainer.add_callback(Look())
    trainer.train()
    assert seen == {2: (False, True), "saved-2": (True, False), 4: (False, True), "saved-4": (True, False)}


def test_moments_of_an_earlier_run_are_removed_before_the_checkpoint_is_overwritten(tmp_path):
    out = tmp_path / "out"
    make_trainer(out, callback=OTACallback("rank1"), max_steps=2, save_steps=2).train()
    old = load_moments(out / "checkpoint-2").metadata["captured_at"]
    seen = {}

    class Look(TrainerCallback):  # after OTACallback: the Trainer saves checkpoint-2 next
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                seen["old moments beside the new weights"] = moments_path(out / "checkpoint-2").exists()

    again = make_trainer(out, callback=OTACallback("rank1"), max_steps=2, save_steps=2)  # same folder, no resume
    again.add_callback(Look())
    again.train()
    assert seen == {"old moments beside the new weights": False}
    assert load_moments(out / "checkpoint-2").metadata["captured_at"] > old
    assert pairing_problems(out / "checkpoint-2") == []


# ----------------------------------------------------------------------------------------
# 2. which weights the moments belong to
# ----------------------------------------------------------------------------------------


def test_metadata_ties_moments_to_their_weights(tmp_path):
    out = tmp_path / "out"
    start = time.time()
    trainer = make_trainer(out, callback=OTACallback("rank1"), max_steps=4, save_steps=2)
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    for folder, step in ((out / "checkpoint-2", 2), (out / "checkpoint-4", 4), (out, 4)):
        meta = load_moments(folder).metadata
        assert meta["global_step"] == step and meta["written_before_weights"] is True
        assert meta["load_best_model_at_end"] is False
        assert isinstance(meta["captured_at"], float) and start <= meta["captured_at"] <= time.time()
        # read before the Trainer wrote these weights (file times come from a coarse clock: a few ms of slack)
        assert meta["captured_at"] <= (folder / "model.safetensors").stat().st_mtime + 0.05
        assert pairing_problems(folder) == []
    assert (
        load_moments(out / "checkpoint-2").metadata["captured_at"]
        < load_moments(out / "checkpoint-4").metadata["captured_at"]
    )
    # the last step's state, captured for checkpoint-4 and again at the end: the same file
    assert moments_path(out).read_bytes() == moments_path(out / "checkpoint-4").read_bytes()

    # a run killed inside on_train_end (moments written, weights not) in a reused output_dir:
    # the weights there are an earlier run's, older than the capture -> the merger refuses the pair
    old = time.time() - 3600
    os.utime(out / "model.safetensors", (old, old))
    assert len(pairing_problems(out)) == 1 and "weights are from an earlier run" in pairing_problems(out)[0]
    # ...and moments of another step than the saved trainer state are refused too
    state = json.loads((out / "trainer_state.json").read_text())
    (out / "trainer_state.json").write_text(json.dumps(dict(state, global_step=8)))
    assert "training step 4, its trainer_state.json is at step 8" in pairing_problems(out)[0]


@pytest.mark.parametrize("save_strategy", ["steps", "best"])
def test_load_best_model_at_end_metadata_matches_the_final_trainer_state(tmp_path, save_strategy):
    out = tmp_path / "out"
    trainer = make_trainer(
        out,
        callback=OTACallback("rank1"),
        max_steps=4,
        save_steps=2,
        save_strategy=save_strategy,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        per_device_eval_batch_size=8,
        eval_dataset=tiny_dataset(8, seed=1),
    )
    trainer.train()
    trainer.save_model()
    trainer.save_state()  # output_dir/trainer_state.json: the final step, best_global_step 2
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["best_global_step"] == 2
    best = load_moments(out / "checkpoint-2").metadata
    copied = load_moments(out).metadata
    assert copied == best  # the best checkpoint's moments, byte for byte
    assert copied["global_step"] == 2 and copied["load_best_model_at_end"] is True
    # "steps": read in on_step_end, before checkpoint-2 was saved; "best": read in on_save, after
    assert copied["written_before_weights"] is (save_strategy == "steps")
    assert pairing_problems(out) == [] and pairing_problems(out / "checkpoint-2") == []
    if save_strategy == "steps":
        assert pairing_problems(out / "checkpoint-4") == []
        assert load_moments(out / "checkpoint-4").metadata["global_step"] == 4


def test_rewrites_keep_the_metadata(tmp_path):
    model = tiny_model(tie=True)
    opt = _stepped_adamw(model)
    before = time.time()
    save_optimizer_moments(tmp_path / "plain", model, opt)  # no Trainer: captured_at still recorded
    assert before <= load_moments(tmp_path / "plain").metadata["captured_at"] <= time.time()

    keys = {"global_step": 7, "captured_at": 1234.5, "written_before_weights": True, "load_best_model_at_end": False}
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt, state_dict={k: v.clone() for k, v in model.state_dict().items()})  # both tied names
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= saved_weight_names(ckpt)
    save_optimizer_moments(ckpt, model, opt, compression="full", tied_aliases=False, metadata=keys)
    assert align_moments_to_weights(ckpt, {"lm_head.weight": "model.embed_tokens.weight"}) is True  # rewritten
    assert "lm_head.weight" in load_moments(ckpt)
    convert_moments(ckpt, tmp_path / "converted", compression="rank1")
    _copy_moments(ckpt, tmp_path / "copied")
    for folder in (ckpt, tmp_path / "converted", tmp_path / "copied"):
        meta = load_moments(folder).metadata
        assert {k: meta[k] for k in keys} == keys, folder


# ----------------------------------------------------------------------------------------
# 3. leftovers of a killed writer
# ----------------------------------------------------------------------------------------


def test_save_moments_removes_the_leftovers_of_dead_writers_only(tmp_path):
    dead, live = dead_pid(), os.getppid()
    folder = moments_path(tmp_path).parent
    folder.mkdir(parents=True)
    names = {
        f"moments.safetensors.tmp-{dead}": False,  # False: must be removed
        f"moments.safetensors.spool-{dead}": False,
        f"moments.safetensors.tmp-{live}": True,  # a live process (maybe writing right now): kept
        f"moments.safetensors.spool-{live}": True,
        f"moments.safetensors.tmp-{dead}x": True,  # not ours
        f"other.safetensors.tmp-{dead}": True,
        "moments.safetensors.tmp-": True,
    }
    for n in names:
        (folder / n).write_bytes(b"partial")
    save_moments(tmp_path, {"w": torch.rand(4, 3)}, metadata={"step": 1})
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["moments.safetensors", *(n for n, keep in names.items() if keep)]
    )

    # the same for the copies OTACallback makes (output_dir/ota/ from a checkpoint)
    dst = tmp_path / "dst"
    (dst / "ota").mkdir(parents=True)
    (dst / "ota" / f"moments.safetensors.tmp-{dead}").write_bytes(b"partial")
    (dst / "ota" / f"moments.safetensors.tmp-{live}").write_bytes(b"partial")
    _copy_moments(tmp_path, dst)
    assert sorted(p.name for p in (dst / "ota").iterdir()) == ["moments.safetensors", f"moments.safetensors.tmp-{live}"]
    assert moments_path(dst).read_bytes() == moments_path(tmp_path).read_bytes()


def test_a_failed_or_killed_save_leaves_nothing(tmp_path):
    # failed: a NaN in the second tensor, after the first was spooled
    with pytest.raises(NumericalError):
        save_moments(tmp_path / "failed", {"a": torch.rand(8, 8), "b": torch.full((3,), float("nan"))})
    assert list((tmp_path / "failed" / "ota").iterdir()) == []

    # killed while streaming tensors (the spool is anonymous: nothing to leave behind)
    proc = run_script(
        """
        import os, sys, torch
        from ota_trainer.moments.format import save_moments

        class Stream(dict):
            def items(self):
                yield "a", torch.rand(256, 256)
                yield "b", torch.rand(256, 256)
                os._exit(3)

        save_moments(sys.argv[1], Stream(), compression="full")
        """,
        str(tmp_path / "killed"),
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert list((tmp_path / "killed" / "ota").iterdir()) == []
