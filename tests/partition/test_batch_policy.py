"""The speculation settings per live batch size (partition.batch_policy): speculation where
the profile predicts it pays at that B, batched autoregressive where it does not (the round
loop following it: tests/runtime/test_batch.py)."""

from __future__ import annotations

from mirror_sd.partition.batch_policy import batch_rows, choose_per_batch, setting_for
from mirror_sd.partition.cost_model import Profile


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
