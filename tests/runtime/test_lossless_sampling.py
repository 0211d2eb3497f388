"""Sampling stays lossless end to end: mirror mode's token distribution equals the target's,
including on rounds that start from a reused branch."""

import torch

from tests.runtime.conftest import CHI2_99_9, chi2, target_dists, tiny_model

V = 6


def test_mirror_sampling_matches_target_distribution(tmp_path, plan_factory):
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3, **small)
    draft = tiny_model(tmp_path, "llama", seed=9, num_hidden_layers=1, **small)
    plan = plan_factory(target, draft, exit_layer=2, mode="mirror", num_draft_tokens=2,
                        exit_top_k=V, branch_budget=3 * V, temperature=1.0)  # fmt: skip
    prompt = [1, 2, 3]
    joint, third = target_dists(target, prompt, V)
    n = 1500
    pairs = torch.zeros(V, V, dtype=torch.double)
    thirds = torch.zeros(V, dtype=torch.double)
    reused_rounds = 0
    for seed in range(n):
        res = plan.generate(prompt, 3, seed=seed)
        a, b, c = res.tokens
        pairs[a, b] += 1
        thirds[c] += 1
        reused_rounds += sum(r.hit is True for r in res.rounds[:-1])
    assert reused_rounds > n // 10, "the test must exercise rounds that reuse a branch"
    assert chi2(pairs.flatten(), joint.flatten()) < CHI2_99_9[35]
    assert chi2(thirds, third) < CHI2_99_9[5]
    # power check: the draft's own distribution is clearly different from the target's
    d_joint, _ = target_dists(draft, prompt, V)
    assert chi2(pairs.flatten(), d_joint.flatten()) > CHI2_99_9[35]
