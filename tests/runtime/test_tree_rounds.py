"""Token trees in the round loop: speculative rounds verify a greedy draft chain plus its
next-best tokens as sibling leaves in one target forward (PackedCache tree rows, prune to the
accepted path); output stays the target's greedy decoding, alone and in batches."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.runtime.acceptance import Sampling
from mirror_sd.runtime.autoregressive import extend, greedy_decode
from mirror_sd.runtime.draft_engine import DraftEngine
from mirror_sd.runtime.packing import PackedCache
from mirror_sd.runtime.token_tree import TokenTree
from tests.runtime.conftest import make_plan, tiny_model


def test_packed_tree_rows_then_prune_read_as_the_accepted_chain(tmp_path):
    """Two sequences in one forward, one a chain, one a tree; after pruning the tree to a
    path, the next token's logits equal those of decoding that path as a plain chain."""
    model = tiny_model(tmp_path, seed=0, num_hidden_layers=2)
    cache = PackedCache(TorchRunner(model, TorchDevice(), 128))
    a, b = [5, 6, 7], [9, 8, 7, 6]
    cache.add("a"), cache.add("b")
    cache.fill("a", a[:-1]), cache.fill("b", b[:-1])
    tree = TokenTree.with_siblings([11, 12], [[13], [14, 15]], root=b[-1])
    # nodes: 0 root, 1 d1=11, 2 d2=12, 3 leaf 13 (beside d1), 4 leaf 14, 5 leaf 15 (beside d2)
    assert tree.parents == [-1, 0, 1, 0, 1, 1]
    ids, pos, mask = cache.inputs({"a": [a[-1], 20], "b": tree.tokens}, {"b": tree.parents})
    assert pos.tolist() == [[2, 3, 3, 4, 5, 4, 5, 5]]
    cache.forward({"a": [a[-1], 20], "b": tree.tokens}, {"b": tree.parents})
    cache.prune("b", len(b) - 1, [0, 1, 4])  # root, d1 = 11, leaf 14
    assert cache.tokens["b"] == [9, 8, 7, 6, 11, 14]
    nxt = cache.forward({"b": [30]})["b"][-1]
    ref = extend(model, model.new_cache(64), b + [11, 14, 30])[-1]
    torch.testing.assert_close(nxt, ref, rtol=1e-5, atol=1e-5)


def test_draft_lists_siblings_only_for_greedy_sequences(tmp_path):
    draft = tiny_model(tmp_path, seed=1, num_hidden_layers=2)
    engine = DraftEngine(TorchRunner(draft, TorchDevice(), 128, name="draft"))
    engine.add("g", Sampling(), torch.Generator(), [1, 2, 3])
    engine.add("s", Sampling(temperature=1.0), torch.Generator().manual_seed(0), [1, 2, 3])
    out = engine.chain({"g": [1, 2, 3], "s": [1, 2, 3]}, 3, siblings=2)
    assert out["s"].alts is None
    alts = out["g"].alts
    assert len(alts) == 3 and all(len(x) == 2 and out["g"].tokens[j] not in x
                                  for j, x in enumerate(alts))  # fmt: skip


def test_tree_rounds_are_lossless_and_take_siblings(tmp_path):
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, seed=1, num_hidden_layers=2)
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8], [9, 9, 2], [4, 4, 4, 4], [1, 2]]
    want = [greedy_decode(target, p, 32) for p in prompts]
    plan = make_plan(target, draft, mode="speculative", num_draft_tokens=4, tree_siblings=4)
    try:
        batch = plan.generate(prompts, 32)
        alone = [plan.generate(p, 32) for p in prompts]
    finally:
        plan.close()
    assert [r.tokens for r in batch] == want
    assert [r.tokens for r in alone] == want
    sources = [g.source for r in alone for g in r.rounds]
    assert any(s.endswith("-tree") for s in sources)  # some round accepted a sibling leaf


def test_trees_are_refused_where_their_rounding_changes_tokens(tmp_path):
    from mirror_sd.partition.block_bounds import tree_rounding
    from mirror_sd.partition.device_map import OrtSpec, TorchSpec

    assert tree_rounding(OrtSpec("a")) is None and tree_rounding(TorchSpec("b")) is None
    assert tree_rounding(OrtSpec("a", quantize="int4")) is None  # regrouped graphs: exact
    assert "int4 on torch" in tree_rounding(TorchSpec("b", quantize="int4"))
    assert "bfloat16" in tree_rounding(TorchSpec("b", dtype="bfloat16"))
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=2)
    plan = make_plan(target, tiny_model(tmp_path, seed=1, num_hidden_layers=1), mode="speculative")
    plan.no_trees = tree_rounding(TorchSpec("b", quantize="int4"))  # as compile() sets it
    try:
        with pytest.raises(ValueError, match="tree_siblings: the target runs int4"):
            plan.generate([1, 2, 3], 4, tree_siblings=2)
        assert len(plan.generate([1, 2, 3], 4).tokens) == 4  # chains still run
    finally:
        plan.close()


def test_a_call_cannot_ask_for_a_tree_past_the_row_invariant_rows(tmp_path):
    """A call's tree_siblings is bounded as compile() bounds the map's: 1 + γ·(1 + s) rows."""
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=2)
    plan = make_plan(target, tiny_model(tmp_path, seed=1, num_hidden_layers=1),
                     mode="speculative", num_draft_tokens=4)  # fmt: skip
    try:
        with pytest.raises(ValueError, match="speculation.tree_siblings.*at most 14"):
            plan.generate([1, 2, 3], 4, tree_siblings=20)
        with pytest.raises(ValueError, match="speculation.num_draft_tokens"):
            plan.generate([1, 2, 3], 4, num_draft_tokens=100)
    finally:
        plan.close()


def test_tree_rounds_feed_the_running_acceptance_rate(tmp_path, monkeypatch):
    """A tree round counts its chain's tokens in the running α, as a chain round does: the
    target as its own draft has every chain token taken."""
    from mirror_sd.runtime.scheduler import VerificationScheduler

    seen, tally = [], VerificationScheduler._tally

    def spy(self, drafted, accepted):
        seen.append((drafted, accepted))
        return tally(self, drafted, accepted)

    monkeypatch.setattr(VerificationScheduler, "_tally", spy)
    model = tiny_model(tmp_path, seed=0, num_hidden_layers=2)
    plan = make_plan(model, model, mode="speculative", num_draft_tokens=3, tree_siblings=1)
    try:
        plan.generate([1, 2, 3], 12)
    finally:
        plan.close()
    assert seen and all(a == d == 3 for d, a in seen[:-1])  # every chain token taken


def test_draft_lists_siblings_per_depth(tmp_path):
    draft = tiny_model(tmp_path, seed=1, num_hidden_layers=2)
    engine = DraftEngine(TorchRunner(draft, TorchDevice(), 128, name="draft"))
    engine.add("g", Sampling(), torch.Generator(), [1, 2, 3])
    out = engine.chain({"g": [1, 2, 3]}, 4, siblings=(2, 0, 1))  # depth 4: past the shape
    assert [len(x) for x in out["g"].alts] == [2, 0, 1, 0]


def test_per_depth_tree_rounds_are_lossless(tmp_path):
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, seed=1, num_hidden_layers=2)
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8], [9, 9, 2]]
    want = [greedy_decode(target, p, 32) for p in prompts]
    plan = make_plan(target, draft, mode="speculative", num_draft_tokens=4)
    try:
        assert [r.tokens for r in plan.generate(prompts, 32, tree_siblings=[4, 2, 1])] == want
        alone = [plan.generate(p, 32, tree_siblings=[4, 2, 1]) for p in prompts]
        with pytest.raises(ValueError, match="no measured tree shape"):
            plan.generate([1, 2, 3], 4, tree_siblings="auto")  # a hand-built plan measured none
    finally:
        plan.close()
    assert [r.tokens for r in alone] == want
    assert any(g.source.endswith("-tree") for r in alone for g in r.rounds)


def test_teacher_forced_coverage_of_the_draft_s_next_best_tokens(tmp_path):
    from mirror_sd.runtime.profiling import teacher_forced

    target = tiny_model(tmp_path, seed=0, num_hidden_layers=2)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]

    def runner(model, name):
        return TorchRunner(model, TorchDevice(), 64, name=name)

    alpha, cov = teacher_forced(runner(target, "t"), runner(target, "d"), ids, siblings=3)
    assert alpha == 1.0 and cov == (0.0, 0.0, 0.0)  # nothing to cover: the draft never misses
    other = tiny_model(tmp_path, seed=5, num_hidden_layers=1)
    alpha, cov = teacher_forced(runner(target, "t"), runner(other, "d"), ids, siblings=3)
    assert alpha < 1 and len(cov) == 3
    assert all(0 <= a <= b <= 1 for a, b in zip(cov, cov[1:], strict=False))
