"""Token Recycling: the successor table learned from verification logits, the walk it
proposes, and plans drafting from it alone that stay the target's greedy decoding."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.runtime.autoregressive import greedy_decode
from mirror_sd.runtime.drafters.recycling import JacobiGuesses, TokenRecycling
from tests.runtime.conftest import make_plan, tiny_model


def _logits(best: list[int], v: int = 10) -> torch.Tensor:
    x = torch.zeros(len(best), v)
    for r, t in enumerate(best):
        x[r, t] = 5.0
        x[r, (t + 1) % v] = 4.0
    return x


def test_the_walk_follows_first_successors_and_stops_where_the_table_ends():
    src = TokenRecycling(k=2)
    src.reset([4, 1])
    assert src.propose(3).tokens == ()  # nothing observed yet
    src.observe([1, 2, 3], _logits([2, 3, 7]))
    assert src.table[1] == [2, 3] and src.table[3] == [7, 8]
    p = src.propose(5)
    assert p.tokens == (2, 3, 7) and p.match_len == 3 and p.source == "recycle"
    assert src.propose(2).tokens == (2, 3)
    src.extend([9, 3])
    assert src.propose(4).tokens == (7,)
    src.observe([3], _logits([5]))  # the newest row wins
    assert src.propose(4).tokens == (5,)


def test_forks_share_the_table():
    from mirror_sd.runtime.drafters.sources import fork

    plan_source = TokenRecycling()
    a, b = fork(plan_source), fork(plan_source)
    a.reset([1]), b.reset([1])
    a.observe([1], _logits([6]))
    assert b.propose(1).tokens == (6,) and plan_source.table is a.table is b.table


def test_jacobi_guesses_are_the_targets_predictions_past_the_rejection():
    src = JacobiGuesses(k=2)
    src.reset([4, 1])
    # block [1, 2, 9, 7]: the target agrees with 2, then says 3 (rejecting 9); its argmaxes
    # at the rows of the rejected tokens are 6 and 7: guesses for the tokens after the 3
    src.observe([1, 2, 9, 7], _logits([2, 3, 6, 7]))
    src.extend([2, 3])  # the commit the greedy verdict predicts
    assert src.propose(2).tokens == (6, 7)
    assert src.propose(4).tokens == (6, 7, 7, 7)  # then the walk: 7's successor is 7
    src.observe([3, 6, 7], _logits([5, 5, 5]))
    src.extend([5])  # another commit (sampled): the guesses are dropped
    assert src.propose(2).tokens == (5, 5)  # only the walk from 5 remains


@pytest.mark.parametrize("source", ["recycle", "jacobi"])
def test_plans_drafting_from_recycled_successors_are_the_target(tmp_path, source):
    """Retrieval only (no draft model), alone and in a batch: the table fills from the
    target's own verifications and its proposals are accepted, output unchanged."""
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=4)
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8]]
    want = [greedy_decode(target, p, 40) for p in prompts]
    plan = make_plan(target, None, mode="speculative", retrieval=source, retrieval_min_match=1,
                     num_draft_tokens=4)  # fmt: skip
    try:
        alone = [plan.generate(p, 40) for p in prompts]
        batch = plan.generate(prompts, 40)
    finally:
        plan.close()
    assert [r.tokens for r in alone] == want and [r.tokens for r in batch] == want
    rounds = [g for r in alone for g in r.rounds]
    assert any(g.source == source and g.accepted > 0 for g in rounds)
    assert len(rounds) < sum(len(w) for w in want)  # fewer rounds than tokens
