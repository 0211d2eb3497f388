"""S2D's sorted early exits on a torch draft (`devices.sorted_exits`): a draft step stops at
its first confident exit and copies its state up for the skipped layers' K/V; output stays
the target's own greedy decoding (alone, batched, mirror) and its law when sampling."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.devices.sorted_exits import (
    SortedExitRunner,
    copy_up_kv,
    exit_heads,
    lens_layers,
)
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.graphs.loader import load_model
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.runtime.autoregressive import greedy_decode
from tests.conftest import make_tiny, save_tiny
from tests.runtime.conftest import (
    CHI2_99_9,
    chi2,
    make_plan,
    sample_counts,
    target_dists,
    tiny_model,
)

V = 8
PROMPTS = [[1, 2, 3], [4, 5], [6, 6, 7, 1]]


def _models(tmp_path, vocab=None):
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    if vocab:
        small["vocab_size"] = vocab
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3, **small)
    draft = tiny_model(tmp_path, "llama", seed=4, num_hidden_layers=8, **small)
    return target, draft


def _runner(draft, threshold, max_len=512):
    inner = TorchRunner(draft, TorchDevice(), max_len, name="draft")
    return SortedExitRunner(inner, exit_heads("lens", draft, None, None), threshold)


def test_lens_exits_sit_inside_the_draft():
    assert lens_layers(8) == [2, 4]
    assert lens_layers(24) == [6, 12]
    assert lens_layers(2) == [1]


def test_a_sure_exit_stops_early_and_copies_its_state_up(tmp_path):
    """Threshold 0: every short step stops at the first exit; its logits are the exit head's,
    and the skipped layers hold the K/V of the copied-up state (not stale rows)."""
    _, draft = _models(tmp_path)
    runner = _runner(draft, threshold=0.0)
    prompt = torch.tensor([[1, 2, 3]])
    runner.forward(prompt, torch.arange(3)[None], causal_mask(0, 3))  # 3 rows: one exit try
    assert runner.exits == {2: 1}
    ids, pos = torch.tensor([[5]]), torch.tensor([[3]])
    logits = runner.forward(ids, pos, causal_mask(3, 1))
    assert runner.exits == {2: 2} and runner.length == 4

    # the same step by hand: layers [0, 2), the exit head, then the copied-up K/V
    ref = TorchRunner(draft, TorchDevice(), 512, name="ref")
    ref.forward(prompt, torch.arange(3)[None], causal_mask(0, 3))
    ref.rollback(0)  # rebuild the prompt's rows exactly as the exit runner did
    x = draft.run_layers(0, 2, draft.embed(prompt), torch.arange(3)[None], causal_mask(0, 3),
                         ref.cache)  # fmt: skip
    copy_up_kv(draft, ref.cache, 2, x, torch.arange(3)[None], causal_mask(0, 3))
    ref.cache.advance(3)
    h = draft.run_layers(0, 2, draft.embed(ids), pos, causal_mask(3, 1), ref.cache)
    assert torch.equal(logits, runner.heads[0].exit_logits(h))
    copy_up_kv(draft, ref.cache, 2, h, pos, causal_mask(3, 1))
    for layer in range(draft.num_layers):
        assert torch.equal(ref.cache.k[layer, :, 3], runner.cache.k[layer, :, 3]), layer
        assert ref.cache.k[layer, :, 3].abs().sum() > 0
    full = TorchRunner(draft, TorchDevice(), 512, name="full")
    full.forward(torch.tensor([[1, 2, 3, 5]]), torch.arange(4)[None], causal_mask(0, 4))
    assert not torch.equal(full.cache.k[5, :, 3], runner.cache.k[5, :, 3])  # really skipped


def test_an_unsure_step_runs_every_layer(tmp_path):
    _, draft = _models(tmp_path)
    runner = _runner(draft, threshold=1.0)  # no softmax of a random model reaches 1.0
    full = TorchRunner(draft, TorchDevice(), 512, name="full")
    ids, pos, mask = torch.tensor([[1, 2]]), torch.arange(2)[None], causal_mask(0, 2)
    assert torch.equal(runner.forward(ids, pos, mask), full.forward(ids, pos, mask))
    assert runner.exits == {8: 1}
    runner.configure(False, 0.0)  # exits off for a call: the full depth, whatever the threshold
    ids, pos, mask = torch.tensor([[3]]), torch.tensor([[2]]), causal_mask(2, 1)
    assert torch.equal(runner.forward(ids, pos, mask), full.forward(ids, pos, mask))
    assert runner.exits == {8: 2}


@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_greedy_output_is_the_targets_alone_and_batched(tmp_path, threshold, mode):
    target, draft = _models(tmp_path)
    want = [greedy_decode(target, p, 20) for p in PROMPTS]
    runner = _runner(draft, threshold)
    plan = make_plan(target, None, draft_runner=runner, mode=mode, draft_exits="lens",
                     draft_exit_threshold=threshold)  # fmt: skip
    try:
        assert [plan.generate(p, 20).tokens for p in PROMPTS] == want
        assert [r.tokens for r in plan.generate(PROMPTS, 20)] == want
        if threshold == 0.0:
            assert runner.exits[2] > 0
        # a call turns the exits off, or moves the threshold, without recompiling; its stats
        # count its own draft steps by the layer they stopped after
        before = sum(runner.exits.values())
        off = plan.generate(PROMPTS[0], 20, draft_exits="none")
        assert off.tokens == want[0] and runner.enabled is False
        assert set(off.stats.draft_exits) == {8} and off.stats.draft_exits[8] > 0
        on = plan.generate(PROMPTS[0], 20, draft_exit_threshold=0.0)
        assert runner.enabled and runner.threshold == 0.0
        assert on.stats.draft_exits[2] > 0 and "after layer 2" in on.stats.summary()
        assert sum(off.stats.draft_exits.values()) + sum(on.stats.draft_exits.values()) == (
            sum(runner.exits.values()) - before
        )
        with pytest.raises(ValueError, match="built into the draft by compile"):
            plan.generate(PROMPTS[0], 4, draft_exits="trained")
        if threshold == 1.0:  # 'auto' is compile's to measure; this plan was made by hand
            bare = make_plan(target, None, draft_runner=runner, mode=mode, draft_exits="lens")
            with pytest.raises(ValueError, match="'auto' is measured by compile"):
                bare.generate(PROMPTS[0], 4)
            bare.close()
    finally:
        plan.close()


def test_sampling_with_early_exits_keeps_the_target_distribution(tmp_path):
    target, draft = _models(tmp_path, vocab=V)
    prompt = [1, 2, 3]
    joint, third = target_dists(target, prompt, V)
    runner = _runner(draft, threshold=0.2)
    plan = make_plan(target, None, draft_runner=runner, mode="speculative", num_draft_tokens=2,
                     draft_exits="lens", draft_exit_threshold=0.2, temperature=1.0)  # fmt: skip
    pairs, thirds = sample_counts(plan, prompt, V, n=1500)
    assert runner.exits[2] > 0 and runner.exits[4] + runner.exits[8] > 0  # both kinds of step
    assert chi2(pairs.flatten(), joint.flatten()) < CHI2_99_9[V * V - 1]
    assert chi2(thirds, third) < CHI2_99_9[V - 1]


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "phi3"])
def test_every_family_copies_its_state_up_losslessly(tmp_path, family):
    """Gemma 3's per-layer RoPE tables and four norms, Qwen 3's q/k norms, Phi-3's fused
    projections: a draft of each family stops at its first exit and the target's output
    does not change."""
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)

    def model(seed, n):  # Gemma 3 names each layer's attention kind
        kinds = {"layer_types": ["sliding_attention", "full_attention"] * (n // 2)}
        extra = kinds if family == "gemma3_text" else {}
        tiny = make_tiny(family, seed=seed, num_hidden_layers=n, **extra, **small)
        return load_model(save_tiny(tiny, tmp_path / f"{family}-{seed}"))

    target, draft = model(0, 2), model(4, 8)
    want = [greedy_decode(target, p, 12) for p in PROMPTS]
    runner = _runner(draft, threshold=0.0)
    plan = make_plan(target, None, exit_layer=1, draft_runner=runner, mode="speculative",
                     draft_exits="lens", draft_exit_threshold=0.0)  # fmt: skip
    try:
        assert [plan.generate(p, 12).tokens for p in PROMPTS] == want
        assert runner.exits[2] > 0
    finally:
        plan.close()
