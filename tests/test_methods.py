"""Every merge method, through one test body per property (#14), over the shared table of
tests/method_cases.py: the independent reference, every backend's bytes, a model that loads,
and the registry's declarations (recipe parameters, CLI flags, the README's table)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import reference as ref
import torch
from method_cases import CASES
from safetensors.torch import load_file

from ota_trainer import merge
from ota_trainer.merger.methods import METHODS, cli_params, markdown_table

IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def ins(tiny_models):
    m = tiny_models
    return {
        "base": ref.state(m["base"]),
        "experts": [ref.state(m[e]) for e in ("e1", "e2", "e3")],
        "vs": [ref.moments(m[e]) for e in ("e1", "e2", "e3")],
        "recipe": {"base_model": str(m["base"]), "models": [str(m[e]) for e in ("e1", "e2", "e3")]},
    }


def _merged(out) -> dict[str, torch.Tensor]:
    result = {}
    for f in sorted(out.glob("*.safetensors")):
        result.update({k: v.to(torch.float64) for k, v in load_file(str(f)).items()})
    return result


def _recipe(ins, method, params):
    return {"method": method, **ins["recipe"], "parameters": dict(params)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_the_independent_reference(ins, tmp_path, case, backend):
    _, method, params, reference, tolerance = case
    backend.merge(_recipe(ins, method, params), tmp_path / "out")
    got, want = _merged(tmp_path / "out"), reference(ins, params)
    assert set(got) == set(want)
    if callable(tolerance):
        problem = tolerance(got, want)
        assert problem is None, problem
    else:
        for n in want:
            assert (got[n] - want[n]).abs().max() <= tolerance + 1e-5 * want[n].abs().max(), n


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_backend_writes_the_same_bytes(ins, tmp_path, monkeypatch, case):
    _, method, params, _, _ = case
    merge(_recipe(ins, method, params), tmp_path / "default", quiet=True)
    merge(_recipe(ins, method, params), tmp_path / "torch-kernels", quiet=True, fast_path=False)
    monkeypatch.setenv("OTA_TRAINER_NATIVE", "0")
    merge(_recipe(ins, method, params), tmp_path / "torch", quiet=True)
    digests = {
        d: hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest()
        for d in ("default", "torch-kernels", "torch")
    }
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_merge_loads_and_runs(ins, tmp_path, case):
    from transformers import AutoModelForCausalLM

    _, method, params, _, _ = case
    merge(_recipe(ins, method, params), tmp_path / "out", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_every_method_has_a_row():
    assert set(METHODS) <= {c[1] for c in CASES}


def test_the_readme_method_table_is_the_registrys():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, (
        "regenerate: python -c 'from ota_trainer.merger.methods import markdown_table; print(markdown_table())'"
    )


def test_every_parameter_is_a_flag_and_every_method_a_choice(capsys):
    from ota_trainer.cli.merge import make_parser

    text = make_parser().format_help()
    for name, (p, _) in cli_params().items():
        if name != "weight":
            flag = ("--no-" if p.kind is bool and p.default else "--") + name.replace("_", "-")
            assert flag in text, flag
    choices = re.search(r"--method \{([^}]*)\}", text).group(1).split(",")
    assert sorted(choices) == sorted(METHODS)


def test_methods_know_nothing_of_each_other_in_the_runner():
    """The runner and the backends never name a method (only the method files do)."""
    root = Path(__file__).resolve().parents[1] / "ota_trainer"
    for f in [
        root / "merger" / "runner.py",
        root / "backends" / "native" / "backend.py",
        root / "backends" / "torch" / "__init__.py",
    ]:
        text = f.read_text()
        for method in METHODS:
            assert f'"{method}"' not in text and f"'{method}'" not in text, (f.name, method)
