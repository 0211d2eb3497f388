"""The retrieval-source registry: one list of names for SpecConfig, compile(), the plan, the
benchmark and the docs; a source module registers itself."""

from pathlib import Path

import pytest

import mirror_sd.api as api
from mirror_sd.bench.methods import RETRIEVAL_METHODS
from mirror_sd.partition import DeviceMapError
from mirror_sd.runtime.drafters import sources as reg
from mirror_sd.runtime.drafters.base import DraftSource
from tests.conftest import TORCH_DRAFT_MAP, tiny_pair

DOCS = Path(__file__).resolve().parents[2] / "docs" / "device_map.md"


def test_every_source_module_registers_and_builds_a_draft_source():
    names = reg.source_names()
    assert names[0] == "none" and {"pld", "sam", "hd", "reference"} <= set(names)
    assert reg.make_source("none", 4) is None
    for name in names[1:]:
        source = reg.make_source(name, 4)
        assert isinstance(source, DraftSource) and source.name == name


def test_unknown_names_list_every_registered_source():
    with pytest.raises(ValueError, match="'bogus'.*pld .*sam "):
        reg.make_source("bogus", 4)


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'sam' is taken"):
        reg.register("sam", "another")(lambda settings: None)


def test_bench_methods_and_docs_derive_from_the_registry():
    for name in reg.sources():
        assert RETRIEVAL_METHODS[name] == {
            "mode": "speculative", "retrieval": name, "model_draft": False,
        }  # fmt: skip
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith("| `retrieval`"))
    for name in reg.source_names():
        assert f"`{name}`" in row, name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


def test_compile_rejects_an_unknown_source_naming_the_key(folders):
    target, draft, _ = folders
    with pytest.raises(DeviceMapError, match=r"speculation\.retrieval.*'bogus'"):
        api.compile(target, draft, TORCH_DRAFT_MAP, retrieval="bogus", max_len=64)


def test_the_reference_source_reuses_the_last_output_for_the_same_prompt(folders):
    """retrieval: reference (SPEC-RL's reuse): the second generation from the same prompt is
    drafted from the first one's output, and the tokens stay the target's."""
    target, draft, _ = folders
    with api.compile(target, draft, TORCH_DRAFT_MAP, mode="speculative", max_len=128,
                     retrieval="reference", model_draft=False) as plan:  # fmt: skip
        first = plan.generate("w1 w2 w3", 24)  # nothing remembered: the target decodes alone
        again = plan.generate("w1 w2 w3", 24)
        other = plan.generate("w2 w1", 24)  # another prompt: no reference
        ref = plan.generate("w1 w2 w3", 24, mode="autoregressive").tokens
    assert first.tokens == again.tokens == ref
    assert "reference" not in first.stats.tokens_by_source
    assert "reference" not in other.stats.tokens_by_source
    assert again.stats.tokens_by_source.get("reference", 0) > 0
    assert again.stats.rounds < first.stats.rounds  # whole blocks accepted from the reference
