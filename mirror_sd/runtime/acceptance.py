"""Acceptance math: logits processing and the lossless verification rules (pure tensor code).

Greedy: accept draft tokens while each equals the target's argmax; the correction
is the target's argmax at the first disagreement (a bonus token when all pass).

Sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_j with probability
min(1, p(d_j) / q(d_j)); at the first rejection sample the correction from
normalize(max(0, p - q)); if all γ pass sample the bonus from p_γ. A deterministic
proposal (a retrieval draft) is the special case q = one-hot(d_j).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """Logits processing shared by target and draft, so p and q see the same transform."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """(..., V) logits -> (..., V) fp32 probabilities after temperature, top-k, top-p."""
    x = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(x, min(s.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = (
            cum - torch.softmax(sorted_x, dim=-1) >= s.top_p
        )  # keep the smallest prefix reaching top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.softmax(x, dim=-1)


def sample(p: torch.Tensor, gen: torch.Generator) -> int:
    """One token from a (V,) distribution."""
    return int(torch.multinomial(p, 1, generator=gen))


@dataclass(frozen=True)
class Verdict:
    accepted: int  # a: leading draft tokens accepted
    correction: int  # c*: target token at depth a (the bonus token when a == γ)


def verify_greedy(draft: list[int], target_logits: torch.Tensor) -> Verdict:
    """draft (γ,) tokens; target_logits (γ + 1, V) for the block [x_n, d_1..d_γ]."""
    best = target_logits.argmax(-1).tolist()  # (γ + 1,)
    a = 0
    while a < len(draft) and draft[a] == best[a]:
        a += 1
    return Verdict(a, best[a])


def verify_sampling(
    draft: list[int],
    q: torch.Tensor | None,
    p: torch.Tensor,
    gen: torch.Generator,
) -> Verdict:
    """Speculative sampling over one block.

    Args:
        draft: d_1..d_γ.
        q: (γ, V) draft distributions each d_j was sampled from, or None for a
            deterministic proposal (q = one-hot).
        p: (γ + 1, V) target distributions (after the same logits processing).
        gen: the verifier's random generator.
    """
    for j, d in enumerate(draft):
        q_d = 1.0 if q is None else float(q[j, d])
        p_d = float(p[j, d])
        if q_d > 0 and torch.rand((), generator=gen).item() * q_d < p_d:
            continue  # accepted with probability min(1, p/q)
        residual = p[j].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (residual - q[j]).clamp_min(0.0)
        total = float(residual.sum())
        if total <= 0:  # p == q exactly: any rejection is measure-zero; fall back to p
            residual = p[j]
        return Verdict(j, sample(residual / residual.sum(), gen))
    return Verdict(len(draft), sample(p[len(draft)], gen))
