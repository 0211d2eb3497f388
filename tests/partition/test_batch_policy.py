"""The speculation settings per live batch size (partition.batch_policy): speculation where
the profile predicts it pays at that B, batched autoregressive where it does not (the round
loop following it: tests/runtime/test_batch.py)."""

from __future__ import annotations

from dataclasses import replace

from mirror_sd.partition.batch_policy import (
    batch_rows,
    choose_per_batch,
    plan_policy,
    setting_for,
)
from mirror_sd.partition.cost_model import Profile
from mirror_sd.partition.spec_config import SpecConfig


def batch_profile(rows_cost: float, draft_step: float = 0.004) -> Profile:
    """t_T(n) = 0.1 s + rows_cost·(n − 1): memory-bound weights plus a per-row compute cost."""
    rows = range(1, 41)
    return Profile(
        num_layers=4,
        t_target={n: 0.1 + rows_cost * (n - 1) for n in rows},
        t_draft={b: draft_step * (1 + 0.1 * (b - 1)) for b in (1, 2, 4, 8, 16)},
        accept_rate=0.7,
    )


def test_speculation_stays_where_rows_are_cheap_and_stops_where_they_are_not():
    cheap = choose_per_batch(batch_profile(0.001), "speculative", 4)
    assert [s.mode for s in cheap] == ["speculative"] * 4
    assert all(s.speedup is None or s.speedup > 1 for s in cheap)
    dear = choose_per_batch(batch_profile(0.05), "speculative", 4)
    assert dear[0].mode == "speculative" and dear[0].reason == "the plan's choice"
    assert dear[-1].mode == "autoregressive" and dear[-1].speedup < 1  # B = 8
    between = [s for s in dear if s.mode == "speculative" and s.batch > 1]
    assert all(s.num_draft_tokens <= 4 for s in between)


def test_unprofiled_sizes_keep_the_plan_choice_and_lookup_takes_the_largest_fit():
    short = Profile(num_layers=4, t_target={n: 0.1 for n in range(1, 6)},
                    t_draft={1: 0.01, 2: 0.01})  # fmt: skip
    policy = choose_per_batch(short, "mirror", 4)
    assert all(s.mode == "mirror" and s.num_draft_tokens == 4 for s in policy)
    assert "not profiled" in policy[1].reason
    assert setting_for(policy, 3).batch == 2 and setting_for(policy, 100).batch == 8
    assert setting_for((), 3) is None
    assert batch_rows(4) == (6, 8, 10, 12, 16, 20, 24, 32, 40)


def test_a_plan_proposing_with_retrieval_alone_is_priced_by_its_rounds_not_the_draft():
    """Mode auto's `sam` alone: the draft idle, so α and its steps play no part; each B
    verifies B·r rows of the measured rounds (r rows, c tokens)."""
    rounds = ((1, 1), (3, 3), (1, 1), (5, 2))  # 7 tokens in 4 rounds of 10 rows
    cheap = replace(batch_profile(0.001, draft_step=5.0), retrieval_source="sam",
                    retrieval_rounds=rounds)  # fmt: skip
    policy = choose_per_batch(cheap, "speculative", 4, retrieval_alone=True)
    assert [s.mode for s in policy] == ["speculative"] * 4  # a 5 s draft step would lose
    p = cheap.target
    b2 = 7 * p(2) / (p(2) + p(6) + p(2) + p(10))
    assert policy[1].speedup == round(b2, 3) and "sam alone" in policy[1].reason
    dear = replace(cheap, t_target={n: 0.1 + 0.05 * (n - 1) for n in range(1, 41)})
    assert [s.mode for s in choose_per_batch(dear, "speculative", 4, retrieval_alone=True)][1:] \
        == ["autoregressive"] * 3  # fmt: skip
    wide = replace(cheap, retrieval_rounds=((9, 4),))  # B = 8 would verify 72 rows
    assert (
        "not profiled at 72 rows"
        in choose_per_batch(wide, "speculative", 4, retrieval_alone=True)[-1].reason
    )
    unmeasured = replace(cheap, retrieval_rounds=())
    assert all(s.speedup is None and s.mode == "speculative"
               for s in choose_per_batch(unmeasured, "speculative", 4, retrieval_alone=True))  # fmt: skip


def test_plan_policy_follows_who_proposes():
    profile = replace(batch_profile(0.001), retrieval_source="sam", retrieval_rounds=((2, 2),))
    alone = SpecConfig(mode="speculative", num_draft_tokens=4, retrieval="sam", model_draft=False)
    with_draft = SpecConfig(mode="speculative", num_draft_tokens=4, retrieval="sam")
    assert plan_policy(None, alone, True) == ()
    assert plan_policy(profile, with_draft, False) == ()  # no draft, and the draft proposes
    assert plan_policy(profile, alone, False)[1].reason.startswith("sam alone")
    assert plan_policy(profile, with_draft, True) == choose_per_batch(profile, "speculative", 4)
    other = SpecConfig(mode="speculative", num_draft_tokens=4, retrieval="pld", model_draft=False)
    assert plan_policy(profile, other, False) == ()  # pld's rounds were not measured
