"""Prefix caching (`speculation.prefix_cache`): finished sequences' rows are retained, a later
prompt sharing their prefix prefills only the rest, and every output equals the one without
the cache: greedy and sampled, batch 1 and batches, every mode, on target and draft."""

from __future__ import annotations

import pytest

from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.runtime.autoregressive import extend
from mirror_sd.runtime.packing import HOLE, PackedCache, common_prefix
from tests.runtime.conftest import tiny_model
from tests.runtime.test_faults import FaultyRunner

TOL = 1e-4


@pytest.fixture
def models(tmp_path):
    return tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4), tiny_model(
        tmp_path, "qwen2", seed=1, num_hidden_layers=2
    )


def test_a_joining_sequence_takes_the_longest_retained_prefix(models):
    model = models[0]
    cache = PackedCache(TorchRunner(model, TorchDevice(), 64), retain=True)
    for sid, toks in {"a": [1, 2, 3, 4, 5], "b": [1, 2, 9, 9]}.items():
        cache.add(sid, toks)
        cache.fill(sid, toks)
    cache.drop("a"), cache.drop("b")
    assert len(cache.retained) == 2 and cache.holes == 0
    # [1, 2, 3, 4, 7]: a's entry shares 4 tokens, b's 2; the last token is never reused
    assert cache.add("c", [1, 2, 3, 4, 7]) == 4
    assert cache.tokens["c"] == [1, 2, 3, 4] and len(cache.retained) == 1
    assert cache.holes == 1  # a's fifth row became a hole
    cache.fill("c", [7])
    ref = extend(model, model.new_cache(64), [1, 2, 3, 4, 7, 8])[-1]
    out = cache.forward({"c": [8]})["c"][-1]
    assert (out - ref).abs().max() <= TOL  # reused rows are that prefix's rows
    # a prompt equal to a retained entry reuses all but its last token
    assert cache.add("d", [1, 2, 9, 9]) == 3
    # no common prefix: a fresh sequence
    assert cache.add("e", [5, 5]) == 0 and cache.tokens["e"] == []


def test_retained_rows_are_evicted_oldest_first_when_rows_are_needed(models):
    cache = PackedCache(TorchRunner(models[0], TorchDevice(), 16), retain=True)
    for sid, first in (("a", 1), ("b", 2)):
        cache.add(sid, [first] * 6)
        cache.fill(sid, [first] * 6)
        cache.drop(sid)
    cache.add("c", [3] * 8)
    cache.fill("c", [3] * 8)  # 12 held + 8 > 16: a (the oldest) goes, b stays
    assert list(cache.retained) == [1] and cache.evicted == 1
    assert cache.compactions == 1 and cache.runner.length == 14  # b moved down over a's rows
    assert int((cache.owner != HOLE).sum()) == 14
    cache.add("d", [2] * 6)
    assert cache.tokens["d"] == [2] * 5  # b's rows, moved by the compaction, still b's


@pytest.mark.parametrize("mode", ["autoregressive", "speculative", "mirror"])
def test_chat_turns_are_identical_with_and_without_the_cache(models, plan_factory, mode):
    """A three-turn chat (each prompt = the last prompt + its answer + a new turn) and a
    batch sharing a system prompt: the same tokens with the cache as without, greedy and
    sampled, and the later turns prefill only what is new."""
    target, draft = models
    plans = {on: plan_factory(target, draft, mode=mode, prefix_cache=on) for on in (False, True)}
    runs = {}
    for on, plan in plans.items():
        prompt, out = [5, 6, 7, 8, 9, 10], []
        for turn in range(3):
            kw = {"temperature": 0.8, "seed": turn} if turn == 1 else {}
            res = plan.generate(prompt, 12, **kw)
            out.append((res.tokens, res.stats.prompt_rows_reused))
            prompt = prompt + res.tokens + [20 + turn, 21 + turn]
        system = [3, 1, 4, 1, 5, 9, 2, 6]
        plan.generate(system + [7], 4)
        batch = plan.generate([system + [8, 8], system + [9]], 10)
        out.append(([r.tokens for r in batch], [r.stats.prompt_rows_reused for r in batch]))
        runs[on] = out
    assert [t for t, _ in runs[True]] == [t for t, _ in runs[False]]
    assert all(n == 0 for _, n in runs[False][:3])
    reused = [n for _, n in runs[True][:3]]
    assert reused[0] == 0 and reused[1] >= 6 + 12 - 1 and reused[2] > reused[1]
    assert sorted(runs[True][3][1]) == [0, 8]  # the first to join takes the system prompt


def test_a_failing_draft_forgets_its_cache_and_output_stays_the_target(models, plan_factory):
    target, draft = models
    runner = FaultyRunner(draft, "raise", after=4)
    plan = plan_factory(target, None, draft_runner=runner, mode="speculative", prefix_cache=True)
    ref = plan_factory(target, None, mode="autoregressive")
    prompt = [5, 6, 7, 8]
    with pytest.warns(UserWarning, match="target-only"):
        first = plan.generate(prompt, 16)
    assert "draft" not in plan._kept  # its rows may be half written: not kept
    runner.fault = None  # the device recovers; the next generation drafts again
    again = plan.generate(prompt + first.tokens + [9], 16)
    assert first.tokens == ref.generate(prompt, 16).tokens
    assert again.tokens == ref.generate(prompt + first.tokens + [9], 16).tokens
    assert again.stats.prompt_rows_reused > 0 and again.stats.fallback is None


def test_an_exception_in_a_runner_call_leaves_the_cache_unusable(models, monkeypatch):
    runner = TorchRunner(models[0], TorchDevice(), 32)
    cache = PackedCache(runner, retain=True)
    cache.add("a", [1, 2, 3])
    cache.fill("a", [1, 2])
    assert cache.usable()
    monkeypatch.setattr(runner, "forward", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cache.forward({"a": [3]})
    assert not cache.usable()
    runner.rollback(0)  # someone else moved the runner: not usable either
    fresh = PackedCache(runner, retain=True)
    fresh.add("b"), fresh.fill("b", [4, 5, 6])
    runner.rollback(1)
    assert not fresh.usable()


def test_only_real_sequences_are_retained_never_branch_rows(models, plan_factory):
    """Mirror rounds roll out branches in the draft's cache; when they end, their rows are
    holes, never retained entries (a branch's tokens are no prefix from position 0)."""
    target, draft = models
    plan = plan_factory(target, draft, mode="mirror", prefix_cache=True)
    prompt = [5, 6, 7, 8, 9, 10]
    res = plan.generate(prompt, 16)
    assert res.stats.hit_rate is not None  # branches were rolled out
    path = prompt + res.tokens
    for role in ("target", "draft"):
        cache = plan._kept[role][0]
        assert len(cache.retained) == 1, role  # the sequence's, no branch's
        ((_, held),) = cache.retained.values()
        # its rows start at position 0 with the prompt (the draft may hold drafted tokens
        # past the committed ones: rows of that continuation, as valid as any)
        assert common_prefix(held, path) >= len(prompt), role
