"""Fuzzing the merger's inputs (issue #13): every damaged input ends in a clean OTAError or in the
PyTorch engine's own merge. A fixed seed and a bounded number of cases here; `python
scripts/fuzz_inputs.py --cases N` for long runs."""

from __future__ import annotations

import os

import pytest
from fuzzing import build_template, check_case, mutations, recipes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CASES = int(os.environ.get("OTA_FUZZ_CASES", "1000"))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return build_template(tmp_path_factory.mktemp("fuzz") / "template")


@pytest.mark.timeout(900)
@settings(
    max_examples=CASES,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(recipe=recipes(), changes=st.lists(mutations, min_size=1, max_size=3))
def test_damaged_inputs_end_in_a_clean_error_or_the_reference_merge(template, recipe, changes):
    check_case(template, recipe, changes)


def test_undamaged_inputs_merge(template):
    for method in ("ota", "ties", "linear", "fisher"):
        assert check_case(template, {"method": method, "base_model": "base", "models": ["e1", "e2"]}, []) == "merged"
