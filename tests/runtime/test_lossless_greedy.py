"""Greedy output of every mode equals the target's own greedy decoding, token for token."""

import pytest
import torch

from mirror_sd.graphs.loader import load_model
from mirror_sd.runtime.autoregressive import greedy_decode
from tests.conftest import make_tiny, save_tiny
from tests.runtime.conftest import tiny_model

MODES = ["autoregressive", "speculative", "mirror"]


def _prompt(seed, n=8):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("draft_seed", [1, 2])
def test_modes_equal_greedy_across_models(tmp_path, plan_factory, family, draft_seed):
    target = tiny_model(tmp_path, family, seed=0, num_hidden_layers=6)
    draft = tiny_model(tmp_path, family, seed=draft_seed, num_hidden_layers=2)
    configs = [(3, 3, 4), (5, 1, 2)] if draft_seed == 1 else [(2, 5, 8)]
    for gamma, exit_layer, kappa in configs:
        plans = {
            m: plan_factory(
                target,
                draft,
                exit_layer=exit_layer,
                mode=m,
                num_draft_tokens=gamma,
                exit_top_k=kappa,
            )
            for m in MODES
        }
        for seed in range(2):
            prompt = _prompt(seed + 10 * draft_seed, n=5 + seed)
            ref = greedy_decode(target, prompt, 24)
            for m, plan in plans.items():
                out = plan.generate(prompt, 24).tokens
                assert out == ref, f"{m} γ={gamma} ℓe={exit_layer} κ={kappa} seed={seed}"


def test_equals_transformers_generate(tmp_path, plan_factory):
    hf = make_tiny("qwen2", seed=3, num_hidden_layers=4)
    target = load_model(save_tiny(hf, tmp_path / "t"))
    draft = tiny_model(tmp_path, "qwen2", seed=4, num_hidden_layers=2)
    plan = plan_factory(target, draft, exit_layer=2, mode="mirror")
    for seed in range(4):
        prompt = _prompt(seed)
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False
        )
        assert plan.generate(prompt, 24).tokens == ref[0, len(prompt) :].tolist()


def test_self_speculation_accepts_everything(tmp_path, plan_factory):
    """draft = target: every draft token is accepted, so each round commits γ + 1 tokens."""
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=4)
    for mode in ("speculative", "mirror"):
        plan = plan_factory(target, target, exit_layer=2, mode=mode, num_draft_tokens=3)
        res = plan.generate([1, 2, 3, 4], 32)
        assert res.tokens == greedy_decode(target, [1, 2, 3, 4], 32)
        assert res.stats.rounds == 8 and res.stats.mean_accepted == 4.0


def test_full_candidate_set_makes_every_round_a_hit(tmp_path, plan_factory):
    """With κ = V and a budget covering every branch, the verdict is always a prepared branch:
    every round after the first starts from a reused rollout, and output is unchanged."""
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "llama", seed=7, num_hidden_layers=2)
    plan = plan_factory(target, draft, exit_layer=3, mode="mirror", num_draft_tokens=2,
                        exit_top_k=97, branch_budget=3 * 97, max_len=2048)  # fmt: skip
    prompt = _prompt(5)
    res = plan.generate(prompt, 20)
    assert res.tokens == greedy_decode(target, prompt, 20)
    assert res.stats.hit_rate == 1.0 and len(res.rounds) > 1
    assert all(r.hit for r in res.rounds)


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_hit_rank_says_which_budgets_would_have_hit(tmp_path, plan_factory, budget):
    """hit_rank places the verdict in the full branch ranking: a round hits exactly when its
    rank is inside the budget, so a replay can ask what another budget would have hit."""
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "llama", seed=7, num_hidden_layers=2)
    plan = plan_factory(target, draft, exit_layer=3, mode="mirror", num_draft_tokens=3,
                        exit_top_k=8, branch_budget=budget)  # fmt: skip
    ranks = []
    for seed in range(3):
        prompt = _prompt(seed + 20)
        res = plan.generate(prompt, 24)
        assert res.tokens == greedy_decode(target, prompt, 24)
        for r in res.rounds:
            if r.hit is not None:
                assert r.hit == (r.hit_rank is not None and r.hit_rank < budget)
                ranks.append(r.hit_rank)
    assert any(k is not None for k in ranks)  # the exit head's top-8 does hold verdicts


def test_reuse_off_never_starts_from_a_branch(tmp_path, plan_factory):
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "llama", seed=7, num_hidden_layers=2)
    on = plan_factory(target, draft, exit_layer=3, exit_top_k=97, branch_budget=300, max_len=2048)
    off = plan_factory(
        target, draft, exit_layer=3, exit_top_k=97, branch_budget=300, max_len=2048, reuse=False
    )
    prompt = _prompt(6)
    a, b = on.generate(prompt, 16), off.generate(prompt, 16)
    assert a.tokens == b.tokens == greedy_decode(target, prompt, 16)
    # with reuse every round but the first skips drafting; without it every round drafts
    assert sum(r.exposed > 0 and r.hit is not None for r in b.rounds) == len(b.rounds)


def test_eos_and_budget_truncate_like_generate(tmp_path, plan_factory):
    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)
    plan = plan_factory(target, draft, exit_layer=2)
    prompt = _prompt(1)
    ref = greedy_decode(target, prompt, 30)
    eos = ref[7]
    out = plan.generate(prompt, 30, eos_token_id=eos).tokens
    assert out == ref[: ref.index(eos) + 1]
    assert plan.generate(prompt, 5).tokens == ref[:5]
