"""Amphista heads end to end: `mirror-sd train amphista`'s library trains heads on the tiny
target's own generations, `compile(..., amphista=file)` loads them (their layer fixes ℓe),
and every mode that takes head blocks stays identical to the plan's own `ar`, alone, as
token trees and in batches; the heads travel with a saved plan; bad files are refused."""

from __future__ import annotations

import pytest
import torch

import mirror_sd.api as api
from mirror_sd.graphs.loader import load_model
from mirror_sd.partition.device_map import DeviceMapError
from mirror_sd.runtime.autoregressive import greedy_decode
from mirror_sd.training.amphista import train_amphista
from mirror_sd.training.collect import collect
from tests.conftest import tiny_pair

LAYER, HEADS = 4, 3
PROMPTS = [[11, 12, 13, 14], [40, 41, 42], [7, 70, 7, 70, 7]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("amph-api"))


@pytest.fixture(scope="module")
def heads_file(folders):
    """Heads fitted to the target's greedy continuations of PROMPTS (what they will verify)."""
    target, _, root = folders
    model = load_model(target)
    n = 40
    chunks = [(p + greedy_decode(model, p, n))[:n] for p in PROMPTS * 2]
    col = collect(model, chunks, [LAYER], progress=False)
    heads = train_amphista(model, col, LAYER, HEADS, None, rank=32, steps=300, batch=64,
                           lr=5e-3, holdout=1, seed=0)  # fmt: skip
    return heads.save(root / "amphista.pt")


@pytest.fixture(scope="module")
def plan(folders, heads_file):
    target, draft, root = folders
    with api.compile(target, draft, onnx_dir=root / "onnx", max_len=256, amphista=str(heads_file),
                     mode="speculative") as p:  # fmt: skip
        yield p


def test_heads_fix_the_exit_layer_and_their_blocks_are_accepted(plan):
    assert plan.spec.exit_layer == LAYER and plan.amphista.layer == LAYER
    for prompt in PROMPTS:
        ref = plan.generate(prompt, 24, mode="autoregressive")
        alone = plan.generate(prompt, 24, mode="speculative", model_draft=False)
        assert alone.tokens == ref.tokens
        heads = [r for r in alone.rounds if r.source.startswith("amphista")]
        assert heads and sum(r.accepted for r in heads) > 0  # trained on these very outputs


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "speculative"},  # heads, the model draft only when they have nothing
        {"mode": "speculative", "model_draft": False, "tree_siblings": 2},
        {"mode": "mirror"},
    ],
)
def test_every_mode_with_heads_matches_ar_alone_and_batched(plan, settings):
    refs = [plan.generate(p, 20, mode="autoregressive").tokens for p in PROMPTS]
    alone = [plan.generate(p, 20, **settings) for p in PROMPTS]
    assert [r.tokens for r in alone] == refs
    assert any(r.source.startswith("amphista") for a in alone for r in a.rounds)
    # (a batch may run another mode: the plan's per-batch-size policy)
    assert [r.tokens for r in plan.generate(PROMPTS, 20, **settings)] == refs


def test_sampled_generation_with_heads_is_reproducible_and_in_vocabulary(plan):
    a = plan.generate(PROMPTS[0], 16, mode="speculative", temperature=0.8, seed=3)
    b = plan.generate(PROMPTS[0], 16, mode="speculative", temperature=0.8, seed=3)
    assert a.tokens == b.tokens and len(a.tokens) == 16


def test_a_saved_plan_keeps_its_heads(plan, tmp_path):
    api.save(plan, tmp_path / "plan")
    assert (tmp_path / "plan" / "amphista.pt").is_file()
    with api.load(tmp_path / "plan") as again:
        assert again.amphista is not None and again.amphista.layer == LAYER
        heads = torch.ones(again.amphista.hidden_size)
        assert again.amphista.propose(heads) == plan.amphista.propose(heads)
        assert "amphista" in api.describe(again)


def test_bad_heads_are_refused_naming_the_key(folders, tmp_path):
    target, draft, root = folders
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a heads file")
    for value, match in ((str(tmp_path / "missing.pt"), "no such file"),
                         (str(junk), "not an Amphista heads file"),
                         ("trained", "mirror-sd train amphista")):  # fmt: skip
        with pytest.raises(DeviceMapError, match=match) as e:
            api.compile(target, draft, onnx_dir=root / "onnx", max_len=256, amphista=value,
                        cache=tmp_path / "cache")  # fmt: skip
        assert "speculation.amphista" in str(e.value)
