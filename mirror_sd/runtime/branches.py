"""Branch planning (pure): which correction paths the draft rolls out while the target verifies.

A branch (j, c) is the hypothesis "draft tokens d_1..d_j are accepted and the target's
correction at depth j is c". Candidates come from the exit head's top-κ at each block
position; c = d_{j+1} is skipped (that is the accept path, not a correction). For j = γ
every candidate is a bonus-token branch. *(ours)* Branches are ranked by the estimated
value P(stop at depth j) · P(c | stop at j) and cut to the budget.

P(stop at j) needs the chance that each draft token is accepted. The exit head's own
probability of d_{j+1} is one estimate, but an early exit head is badly calibrated for it
(it agrees with the target far less often than the draft does), which starves the
bonus-token branches (j = γ) that win whenever the whole block is accepted. Given the
draft's per-token acceptance rate α, P(stop at j) = α^j·(1 − α) for j < γ and α^γ for
j = γ, and the correction is one of the exit candidates other than d_{j+1}, renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Branch:
    depth: int  # j: accepted draft tokens on this path
    token: int  # c: the correction (or bonus) token the rollout starts from
    value: float  # estimated probability that the verdict is exactly (j, c)


def exit_candidates(exit_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ + 1, V) exit-head logits -> top-κ ids and probabilities, both (γ + 1, κ).

    Only these cross the token channel: (γ + 1)·κ ids and probabilities.
    """
    p = torch.softmax(exit_logits.float(), dim=-1)
    top = torch.topk(p, k, dim=-1)
    return top.indices, top.values


def plan_branches(
    draft: list[int], cand_ids: torch.Tensor, cand_probs: torch.Tensor, budget: int,
    accept_rate: float | None = None,
) -> list[Branch]:  # fmt: skip
    """Rank the branches of one block and keep the `budget` most probable.

    Args:
        draft: d_1..d_γ of the block being verified.
        cand_ids, cand_probs: (γ + 1, κ) exit candidates per block position.
        budget: the most branches to return.
        accept_rate: the draft's per-token acceptance rate α; None = estimate each
            acceptance by the exit head's probability of the draft token.
    Returns:
        Branches by decreasing value, ties broken by (depth, candidate rank) for determinism.
    """
    ids, pr = cand_ids.tolist(), cand_probs.tolist()
    gamma = len(draft)
    out: list[tuple[float, int, int, Branch]] = []
    reach = 1.0  # estimated P(d_1..d_j all accepted)
    for j in range(gamma + 1):
        nxt = draft[j] if j < gamma else None
        p_accept = sum(p for c, p in zip(ids[j], pr[j], strict=True) if c == nxt)
        if accept_rate is None:
            stop, norm = reach, 1.0
        else:  # P(stop at j) from α; the correction is one of the candidates other than d_{j+1}
            stop = reach * (1 - accept_rate) if j < gamma else reach
            norm = max(1.0 - p_accept, 1e-9) if j < gamma else 1.0
        for rank, (c, p) in enumerate(zip(ids[j], pr[j], strict=True)):
            if c != nxt:
                v = stop * p / norm
                out.append((-v, j, rank, Branch(j, c, v)))
        reach *= p_accept if accept_rate is None else accept_rate
    out.sort(key=lambda t: t[:3])
    return [b for *_, b in out[:budget]]
