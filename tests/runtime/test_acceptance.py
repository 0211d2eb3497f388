"""Acceptance math: greedy verdicts and the distribution-preserving sampling rule."""

import pytest
import torch

from mirror_sd.runtime.acceptance import Sampling, probs, verify_greedy, verify_sampling
from mirror_sd.runtime.branches import plan_branches

CHI2_99_9 = {4: 18.47, 7: 24.32}  # chi-square critical values at p = 0.001


def chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_greedy_verdicts():
    logits = torch.eye(5)[[1, 2, 3, 4]]  # target argmax per position: 1, 2, 3, 4
    v = verify_greedy([1, 2, 3], logits)
    assert (v.accepted, v.correction) == (3, 4)
    v = verify_greedy([1, 0, 3], logits)
    assert (v.accepted, v.correction) == (1, 2)
    v = verify_greedy([], logits[:1])
    assert (v.accepted, v.correction) == (0, 1)


def test_probs_processing():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert torch.allclose(probs(logits, Sampling(1.0)), torch.softmax(logits, -1))
    top2 = probs(logits, Sampling(1.0, top_k=2))
    assert top2[2] == 0 and top2[3] == 0 and torch.isclose(top2.sum(), torch.tensor(1.0))
    nucleus = probs(logits, Sampling(1.0, top_p=0.7))  # softmax = .64 .24 .09 .03
    assert (nucleus > 0).tolist() == [True, True, False, False]


def _first_token_counts(p, q, n, deterministic=False):
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(p.shape[-1])
    for _ in range(n):
        d = int(torch.argmax(q)) if deterministic else int(torch.multinomial(q, 1, generator=gen))
        v = verify_sampling([d], None if deterministic else q[None], torch.stack([p, p]), gen)
        counts[d if v.accepted else v.correction] += 1
    return counts


def test_speculative_sampling_preserves_target_distribution():
    p = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    q = torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1])
    counts = _first_token_counts(p, q, 6000)
    assert chi2(counts, p) < CHI2_99_9[4]
    # the same test has power: the draft's own distribution is rejected
    assert chi2(counts, q) > CHI2_99_9[4]


def test_deterministic_proposal_preserves_target_distribution():
    """A retrieval draft is a one-hot q: accept with p(d), else sample from p without d."""
    p = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    q = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    counts = _first_token_counts(p, q, 6000, deterministic=True)
    assert chi2(counts, p) < CHI2_99_9[4]


def test_branches_ranked_by_value_and_skip_the_accept_path():
    ids = torch.tensor([[7, 8], [9, 7], [5, 6]])  # γ = 2: positions 0, 1, 2
    pr = torch.tensor([[0.6, 0.4], [0.5, 0.3], [0.9, 0.1]])
    # draft = [7, 9]: P(accept d1) = .6, P(accept d2) = .5
    out = plan_branches([7, 9], ids, pr, budget=10)
    assert [(b.depth, b.token) for b in out] == [(0, 8), (2, 5), (1, 7), (2, 6)]
    assert abs(out[1].value - 0.6 * 0.5 * 0.9) < 1e-6
    assert len(plan_branches([7, 9], ids, pr, budget=2)) == 2


def test_branches_ranked_with_an_acceptance_rate_favour_the_bonus_path():
    """With α given, P(stop at j) = α^j(1−α) (α^γ at j = γ); the exit head's probability of
    the draft token no longer decides how deep the branches go."""
    ids = torch.tensor([[7, 8], [9, 7], [5, 6]])  # γ = 2
    pr = torch.tensor([[0.1, 0.4], [0.1, 0.3], [0.9, 0.1]])  # exit head doubts d1, d2
    assert plan_branches([7, 9], ids, pr, budget=1)[0].depth == 0  # exit-head estimate
    out = plan_branches([7, 9], ids, pr, budget=10, accept_rate=0.8)
    assert [(b.depth, b.token) for b in out[:2]] == [(2, 5), (0, 8)]
    assert out[0].value == pytest.approx(0.8 * 0.8 * 0.9)
    assert out[1].value == pytest.approx(0.2 * 0.4 / (1 - 0.1))  # renormalised without d1
