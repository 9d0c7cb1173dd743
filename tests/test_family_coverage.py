"""Every family in the registry is tested against transformers (or, for families whose code is not in transformers,
against the published equations) by some tests/test_families*.py module: each names the model_types it tests in
FAMILIES_TESTED, so a family added in a new module with a new test module needs no edit here."""

from __future__ import annotations

import importlib
from pathlib import Path

from megatron_llm.checkpoint.families import FAMILIES


def families_tested() -> dict[str, set[str]]:
    """test module -> the model_types it tests (none for a module testing something else of families, e.g. exports)."""
    modules = sorted(path.stem for path in Path(__file__).parent.glob("test_families*.py"))
    return {name: getattr(importlib.import_module(f"tests.{name}"), "FAMILIES_TESTED", set()) for name in modules}


def test_every_family_is_tested_and_every_tested_family_registered():
    tested = families_tested()
    assert sorted(set(FAMILIES) - set().union(*tested.values())) == []
    assert {name: sorted(types - set(FAMILIES)) for name, types in tested.items() if types - set(FAMILIES)} == {}
