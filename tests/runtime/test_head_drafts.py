"""Amphista heads as a proposer in the round loop (`runtime.head_drafts`): blocks read off the
target's hidden state at ℓe are verified like any draft, so output stays the target's own
greedy decoding (alone, in batches, as trees, in mirror mode) and its distribution when
sampling; heads trained in a test propose tokens the target accepts."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.runtime.autoregressive import greedy_decode
from mirror_sd.runtime.head_drafts import HeadDrafts
from tests.runtime.conftest import (
    CHI2_99_9,
    chi2,
    make_plan,
    sample_counts,
    target_dists,
    tiny_model,
)

V = 8  # a small vocabulary: pseudo-random head guesses are accepted often enough to matter


class HashHeads:
    """Deterministic guesses from the hidden row: `heads` tokens and per head the next ones."""

    def __init__(self, layer: int, heads: int = 3, vocab: int = V):
        self.layer, self.k, self.v = layer, heads, vocab
        self.calls = 0

    def propose(self, hidden, top_k=1):
        self.calls += 1
        seed = int(hidden.double().abs().sum().item() * 1e6) % (2**31)
        order = [torch.randperm(self.v, generator=torch.Generator().manual_seed(seed + j))
                 for j in range(self.k)]  # fmt: skip
        return [int(o[0]) for o in order], [o[1:top_k].tolist() for o in order]


def _models(tmp_path):
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3, **small)
    draft = tiny_model(tmp_path, "llama", seed=9, num_hidden_layers=1, **small)
    return target, draft


def _plan(target, draft, heads, **spec):
    plan = make_plan(target, draft, amphista="stub", **spec)
    plan.amphista = heads  # what compile() loads for speculation.amphista
    return plan


PROMPTS = [[1, 2, 3], [4, 5], [6, 6, 7, 1], [2], [3, 3, 3]]


@pytest.mark.parametrize("siblings", [0, 2])
def test_head_blocks_keep_greedy_output_alone_and_in_batches(tmp_path, siblings):
    target, _ = _models(tmp_path)
    want = [greedy_decode(target, p, 24) for p in PROMPTS]
    heads = HashHeads(layer=2)
    plan = _plan(target, None, heads, mode="speculative", num_draft_tokens=3,
                 tree_siblings=siblings)  # fmt: skip
    try:
        alone = [plan.generate(p, 24) for p in PROMPTS]
        batch = plan.generate(PROMPTS, 24)
    finally:
        plan.close()
    assert [r.tokens for r in alone] == want
    assert [r.tokens for r in batch] == want
    rounds = [g for r in alone for g in r.rounds]
    assert any(g.source.startswith("amphista") and g.accepted > 0 for g in rounds)
    assert rounds[0].source == "target"  # no hidden state before the first verification
    if siblings:
        assert any(g.source == "amphista-tree" for g in rounds)


def test_mirror_rounds_start_from_head_blocks_and_stay_lossless(tmp_path):
    target, draft = _models(tmp_path)
    want = [greedy_decode(target, p, 24) for p in PROMPTS]
    heads = HashHeads(layer=2)
    plan = _plan(target, draft, heads, mode="mirror", num_draft_tokens=3, exit_top_k=2)
    try:
        got = [plan.generate(p, 24) for p in PROMPTS]
    finally:
        plan.close()
    assert [r.tokens for r in got] == want
    sources = {g.source for r in got for g in r.rounds}
    assert "amphista" in sources and heads.calls > 0


def test_turning_heads_off_per_call_and_refusing_others(tmp_path):
    target, _ = _models(tmp_path)
    heads = HashHeads(layer=2)
    plan = _plan(target, None, heads, mode="speculative", num_draft_tokens=3)
    try:
        off = plan.generate([1, 2, 3], 8, amphista="none")
        assert heads.calls == 0 and {g.source for g in off.rounds} == {"target"}
        with pytest.raises(ValueError, match="speculation.amphista"):
            plan.generate([1, 2, 3], 8, amphista="/some/other/heads.pt")
    finally:
        plan.close()


def test_sampling_with_head_blocks_keeps_the_target_distribution(tmp_path):
    target, _ = _models(tmp_path)
    prompt = [1, 2, 3]
    joint, third = target_dists(target, prompt, V)
    plan = _plan(target, None, HashHeads(layer=2), mode="speculative", num_draft_tokens=2,
                 temperature=1.0)  # fmt: skip
    pairs, thirds = sample_counts(plan, prompt, V, n=1500)
    assert chi2(pairs.flatten(), joint.flatten()) < CHI2_99_9[V * V - 1]
    assert chi2(thirds, third) < CHI2_99_9[V - 1]


def test_mirror_sampling_with_head_blocks_keeps_the_target_distribution(tmp_path):
    target, draft = _models(tmp_path)
    prompt = [1, 2, 3]
    joint, third = target_dists(target, prompt, V)
    heads = HashHeads(layer=2)
    plan = _plan(target, draft, heads, mode="mirror", num_draft_tokens=2, exit_top_k=V,
                 temperature=1.0)  # fmt: skip
    pairs, thirds = sample_counts(plan, prompt, V, n=1500)
    assert heads.calls > 0
    assert chi2(pairs.flatten(), joint.flatten()) < CHI2_99_9[V * V - 1]
    assert chi2(thirds, third) < CHI2_99_9[V - 1]


def test_head_drafts_trim_to_gamma_and_are_taken_once():
    hd = HeadDrafts(HashHeads(layer=1, heads=4))
    hd.after(7, torch.ones(4), gamma=4, siblings=2)
    block = hd.take(7, gamma=2)
    assert len(block.tokens) == 2 and len(block.alts) == 2 and block.q is None
    assert all(len(a) == 2 and t not in a for t, a in zip(block.tokens, block.alts, strict=True))
    assert hd.take(7, gamma=2) is None  # a block serves the round right after it, once
