"""Cost model: the latency formulas on hand numbers, the hit-rate model, Profile files, choose()."""

from __future__ import annotations

import json

import pytest

from mirror_sd.partition import Profile, SpecConfig, choose
from mirror_sd.partition.cost_model import (
    GAMMA_RANGE,
    TOP_K_RANGE,
    branch_masses,
    exit_agreement,
    expected_tokens,
    hit_rate,
    mirror_round_time,
    num_branches,
    prefix_time,
    speedup,
    stop_probs,
    suffix_time,
    vanilla_round_time,
)

FLAT = {1: 1.0, 16: 1.0}  # t_T(n) = 1 s for every n (the bf16-on-AMX shape of docs/benchmarks.md)


def _profile(**kw) -> Profile:
    base = dict(num_layers=4, t_target=FLAT, t_draft={1: 0.1, 16: 1.6}, accept_rate=0.5)
    return Profile(**{**base, **kw})


# --- formulas ----------------------------------------------------------------------------


def test_prefix_and_suffix_split_uniform_layers():
    assert prefix_time(0.3, 7, 28) == pytest.approx(0.075)
    assert suffix_time(0.3, 7, 28) == pytest.approx(0.225)


def test_round_times():
    assert vanilla_round_time(0.3, 0.05, 4) == pytest.approx(0.5)
    # exposed = 0.002 + 4·0.06 − 0.2 = 0.042; miss = 0.25·4·0.05 = 0.05
    t = mirror_round_time(0.3, 0.2, 0.06, 0.05, 4, 0.75, t_sync=0.01, t_chan=0.002)
    assert t == pytest.approx(0.3 + 0.01 + 0.042 + 0.05)
    # a hidden draft and a perfect hit rate leave only the target's forward
    assert mirror_round_time(0.3, 0.2, 0.04, 0.05, 4, 1.0) == pytest.approx(0.3)


def test_expected_tokens_and_speedup():
    assert expected_tokens(0.5, 3) == pytest.approx(1.875)
    assert expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.0, 5) == 1.0
    assert speedup(2.0, 0.3, 0.4) == pytest.approx(1.5)


def test_stop_probs_sum_to_one():
    assert stop_probs(0.5, 2) == [0.5, 0.25, 0.25]
    assert sum(stop_probs(0.8, 7)) == pytest.approx(1.0)


def test_branch_masses_and_hit_rate_by_hand():
    # α=0.5, γ=2, κ=2, a=0.5: depth 0 -> 0.5·0.5; depth 1 -> 0.25·0.5; bonus -> 0.25·0.5, 0.25·0.25
    assert branch_masses(0.5, 2, 2, 0.5) == [0.25, 0.125, 0.125, 0.0625]
    assert num_branches(2, 2) == 4
    assert hit_rate(0.5, 2, 2, 2, 0.5) == pytest.approx(0.375)
    assert hit_rate(0.5, 2, 2, 4, 0.5) == pytest.approx(0.5625)
    assert hit_rate(0.5, 2, 2, 99, 1.0) == pytest.approx(1.0)
    assert hit_rate(0.5, 2, 1, 99, 1.0) == pytest.approx(0.25)  # κ=1: only the bonus branch


def test_exit_agreement_measured_interpolated_assumed():
    p = _profile(num_layers=8, hit_rate_by_exit_layer={2: 0.2, 6: 0.6})
    assert exit_agreement(p, 2) == (0.2, "measured")
    assert exit_agreement(p, 4)[1] == "interpolated"
    assert exit_agreement(p, 4)[0] == pytest.approx(0.4)
    assert exit_agreement(_profile(num_layers=8), 4) == (pytest.approx(0.30), "ASSUMED")
    assert exit_agreement(_profile(num_layers=8), 3)[0] == pytest.approx(0.20)


# --- Profile -------------------------------------------------------------------------------


def test_profile_interpolates_and_refuses_to_extrapolate():
    p = _profile(t_target={1: 0.2, 3: 0.4, 5: 0.8})
    assert p.target(3) == 0.4
    assert p.target(4) == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"profile t_target covers 1..5; 9 needs a measurement"):
        p.target(9)


def test_profile_json_round_trip(tmp_path):
    p = _profile(t_exit_head=0.01, t_chan=1e-4, hit_rate_by_exit_layer={2: 0.3}, description="x")
    p.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == p
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["version"] == 1 and data["t_target"] == {"1": 1.0, "16": 1.0}


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(t_target={2: 1.0}),
            "profile t_target needs positive times for n >= 1, n = 1 included",
        ),
        (dict(t_draft={1: 0.0}), "profile t_draft needs positive times"),
        (dict(accept_rate=1.5), "profile accept_rate must be in [0, 1], got 1.5"),
        (
            dict(hit_rate_by_exit_layer={4: 0.5}),
            "hit_rate_by_exit_layer[4] = 0.5: need 1 <= layer <= 3",
        ),
        (dict(num_layers=1), "profile num_layers must be an integer >= 2, got 1"),
        (dict(t_chan=-1.0), "profile t_chan must be >= 0, got -1.0"),
    ],
)
def test_profile_validation(kw, message):
    with pytest.raises(ValueError) as info:
        _profile(**kw)
    assert message in str(info.value)


def test_profile_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({**_profile().to_dict(), "t_targets": {}}))
    with pytest.raises(ValueError, match=rf"{f}: profile: unknown keys \['t_targets'\]"):
        Profile.load(f)


# --- choose --------------------------------------------------------------------------------


def test_choose_picks_the_layer_whose_exit_head_agrees():
    p = _profile(hit_rate_by_exit_layer={1: 0.1, 2: 0.9, 3: 0.2})
    c = choose(p)
    assert c.exit_layer == 2 and c.agreement == 0.9 and c.agreement_source == "measured"
    assert (c.num_draft_tokens, c.exit_top_k) == (4, 4)  # SpecConfig's values, not searched


def test_choose_budget_fills_the_suffix_exactly():
    # ℓe=2 of 4: t_suf = 0.5 s; γ=1, κ=4 -> 7 branches; γ·t_d(B) = 0.1·B <= 0.5 -> B <= 5.
    p = _profile(hit_rate_by_exit_layer={2: 0.5})
    c = choose(p, SpecConfig(num_draft_tokens=1, exit_top_k=4))
    assert (c.exit_layer, c.branch_budget, c.num_branches) == (2, 5, 7)
    # masses .25 .25 .125 .125 .0625 | .0625 .03125 -> h = 0.8125
    assert c.hit_rate == pytest.approx(0.8125)
    assert c.t_suf == pytest.approx(0.5) and c.t_rollout == pytest.approx(0.5)
    assert c.t_exposed == 0.0 and c.draft_hidden
    assert c.t_round_mirror == pytest.approx(1.0 + (1 - 0.8125) * 0.1)
    assert c.t_round_vanilla == pytest.approx(1.1)
    assert c.expected_tokens == pytest.approx(1.5)
    assert c.speedup_mirror == pytest.approx(1.5 / 1.01875)
    assert c.speedup_vanilla == pytest.approx(1.5 / 1.1)
    assert c.speedup_autoregressive == 1.0 and c.best_mode == "mirror"
    assert c.candidates == 7  # B = 1..7 at the one measured layer


def test_choose_respects_fixed_values():
    p = _profile(hit_rate_by_exit_layer={1: 0.1, 2: 0.9, 3: 0.2})
    spec = SpecConfig(exit_layer=3, branch_budget=2, num_draft_tokens=2, exit_top_k=3)
    c = choose(p, spec, exit_layers=(1, 2), budgets=(1, 7))
    assert (c.exit_layer, c.branch_budget, c.num_draft_tokens, c.exit_top_k) == (3, 2, 2, 3)
    assert c.spec == spec
    assert c.candidates == 1


def test_choose_fills_auto_values_into_the_spec():
    c = choose(_profile(hit_rate_by_exit_layer={2: 0.5}), SpecConfig(temperature=0.7))
    assert c.spec == SpecConfig(
        temperature=0.7, exit_layer=2, branch_budget=c.branch_budget, num_draft_tokens=4
    )
    assert isinstance(c.spec.branch_budget, int)


def test_choose_takes_the_longest_gamma_when_verification_is_flat():
    p = _profile(accept_rate=0.9, t_draft={1: 0.001, 16: 0.016})
    c = choose(p, SpecConfig(exit_layer=1), gammas=GAMMA_RANGE, top_ks=TOP_K_RANGE)
    assert c.num_draft_tokens == 8


def test_choose_stops_before_a_verification_cost_cliff():
    # fp32-like cliff (docs/benchmarks.md): verifying 4+ rows costs twice as much as 1..3
    p = _profile(accept_rate=0.6, t_target={1: 1.0, 3: 1.0, 4: 2.0, 16: 2.0})
    c = choose(p, SpecConfig(exit_layer=2), gammas=GAMMA_RANGE)
    assert c.num_draft_tokens == 2


def test_choose_ties_go_to_the_smallest_gamma():
    p = _profile(accept_rate=0.0, t_draft={1: 0.001, 16: 0.016}, hit_rate_by_exit_layer={2: 1.0})
    assert choose(p, gammas=GAMMA_RANGE).num_draft_tokens == 1


def test_choose_when_nothing_hides_the_draft():
    slow = _profile(t_draft={1: 5.0, 16: 80.0}, hit_rate_by_exit_layer={2: 0.5})
    c = choose(slow)
    assert not c.draft_hidden and c.t_exposed > 0
    assert c.best_mode == "autoregressive"
    assert "NOT hidden" in c.explain()


def test_choose_needs_measured_timings_for_fixed_values():
    with pytest.raises(ValueError, match="t_target covers 1..5; 9 needs a measurement"):
        choose(_profile(t_target={1: 1.0, 5: 1.0}), SpecConfig(num_draft_tokens=8))


def test_explain_names_values_numbers_and_assumptions():
    c = choose(_profile(accept_rate=None, num_layers=8))
    text = c.explain()
    assert f"exit_layer ℓe={c.exit_layer}" in text
    assert f"hit rate h = {c.hit_rate:.3f}" in text
    assert "acceptance rate α = 0.6 (ASSUMED" in text
    assert "ASSUMED from the logit-lens depth curve" in text
    assert f"mirror {c.speedup_mirror:.2f}x" in text


def test_overlap_slowdown_stretches_the_overlapped_suffix_and_rollouts():
    base = mirror_round_time(0.3, 0.2, 0.04, 0.05, 4, 1.0)  # hidden draft, all hits
    # f = 1.5: the suffix takes 0.3 s instead of 0.2; rollouts 0.24 s, still hidden
    assert mirror_round_time(0.3, 0.2, 0.04, 0.05, 4, 1.0, slowdown=1.5) == pytest.approx(
        base + 0.1
    )
    # f = 2 with rollouts longer than the suffix: exposure doubles as well
    t = mirror_round_time(0.3, 0.2, 0.06, 0.05, 4, 1.0, slowdown=2.0)
    assert t == pytest.approx(0.3 + 0.2 + 2 * (0.24 - 0.2))


def test_a_shared_machine_can_make_vanilla_the_best_mode():
    p = _profile(hit_rate_by_exit_layer={2: 0.3}, accept_rate=0.8)
    assert choose(p).best_mode == "mirror"
    slow = choose(_profile(hit_rate_by_exit_layer={2: 0.3}, accept_rate=0.8, overlap_slowdown=2.5))
    assert slow.best_mode == "speculative" and slow.overlap_slowdown == 2.5
    assert "overlap slowdown f = 2.50" in slow.explain()
    with pytest.raises(ValueError, match="overlap_slowdown must be >= 1"):
        _profile(overlap_slowdown=0.5)


# --- the draft-free retrieval candidate of mode auto ---------------------------------------

LINEAR = {1: 1.0, 2: 1.2, 5: 1.8, 16: 4.0}  # a block of n rows costs more than one row


def test_retrieval_speedup_is_the_replayed_rounds_tokens_over_their_blocks():
    # three rounds: a 5-row block committing 4 tokens, two one-row steps
    p = _profile(t_target=LINEAR, retrieval_source="sam", retrieval_rounds=((5, 4), (1, 1), (1, 1)))
    assert p.retrieval_speedup() == pytest.approx(6 * 1.0 / (1.8 + 1.0 + 1.0))
    assert _profile().retrieval_speedup() == 0.0  # not measured
    p2 = Profile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert p2 == p and p2.retrieval_rounds == ((5, 4), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="1 <= tokens <= rows"):
        _profile(retrieval_rounds=((2, 3),))


def test_mode_auto_weighs_retrieval_alone_against_the_draft():
    # a poor draft (α = 0.2) on a verification-heavy target: the replayed retrieval rounds win
    rounds = ((5, 5), (5, 5), (1, 1))
    p = _profile(t_target=LINEAR, accept_rate=0.2, overlap_slowdown=3.0,
                 retrieval_source="sam", retrieval_rounds=rounds)  # fmt: skip
    c = choose(p)
    assert c.best_candidate == "retrieval" and c.best_mode == "speculative"
    assert c.speedup_retrieval == pytest.approx(11 / 4.6)
    assert c.speedup_retrieval > max(c.speedup_vanilla, c.speedup_mirror, 1.0)
    assert "sam alone (draft idle) 2.39x" in c.mode_verdict()
    assert "best mode: speculative (sam alone)" in c.explain()
    # a map with a retrieval source of its own, or no model draft, is not second-guessed
    for spec in (SpecConfig(retrieval="pld"), SpecConfig(model_draft=False)):
        other = choose(p, spec)
        assert other.speedup_retrieval == 0.0 and other.best_candidate != "retrieval"
    # one-row rounds only (nothing to retrieve): never better than autoregressive
    flat = choose(_profile(t_target=LINEAR, accept_rate=0.2, retrieval_source="sam",
                           retrieval_rounds=((1, 1),) * 8))  # fmt: skip
    assert flat.speedup_retrieval == pytest.approx(1.0) and flat.best_candidate != "retrieval"
