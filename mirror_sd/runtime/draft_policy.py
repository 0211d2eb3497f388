"""Draft-length policies: when the draft stops proposing tokens before γ (pure tensor code).

A fixed γ wastes draft forwards where the draft is unsure: the target will likely reject
there, and every token after a rejection is thrown away. Two training-free stopping
rules read the draft's own distribution q at each step:

- ``confidence`` (Kangaroo's second early exit, arXiv 2404.18911): stop once the top-1
  probability of q falls below the threshold.
- ``entropy`` (SVIP, arXiv 2411.18462): stop once the entropy of q, in nats, exceeds the
  threshold. SVIP bounds the acceptance rate from below by a decreasing function of the
  draft entropy, so thresholding any monotone transform of it (e.g. its square root) is
  this same rule with a rescaled threshold.

Semantics (the same in a `DraftEngine.chain` and in every branch of a mirror `rollout`): the
policy is asked *after* a token has been drawn from q, about that same q. When it says
stop, the low-confidence token itself is still proposed (its distribution is already
computed, and verifying one more position costs the target almost nothing), but it is
not fed back, so the draft forward that would predict the next token is saved. Hence a
round always proposes at least one token and at most γ. With sampling the decision is
a function of the draft's context only (a stopping time), so speculative sampling stays
lossless; greedy verification is unaffected by what is proposed.

Which distribution: with sampling, the q the token was drawn from (after temperature,
top-k, top-p) — the q that acceptance min(1, p/q) uses; when greedy, softmax of the raw
draft logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mirror_sd.partition.spec_config import DRAFT_STOPS


@dataclass(frozen=True)
class DraftPolicy:
    """Whether drafting continues after a token drawn from a distribution q.

    kind: none | confidence | entropy (SpecConfig.draft_stop); threshold: a probability for
    confidence, nats for entropy, ignored for none (SpecConfig.draft_stop_threshold).
    """

    kind: str
    threshold: float

    def __post_init__(self) -> None:
        if self.kind not in DRAFT_STOPS:
            raise ValueError(
                f"draft stop policy {self.kind!r}: expected one of {', '.join(DRAFT_STOPS)}"
            )

    @property
    def active(self) -> bool:
        """False for "none": callers skip computing distributions they would not use."""
        return self.kind != "none"

    def stops(self, q: torch.Tensor) -> torch.Tensor:
        """(..., V) probabilities -> (...) bool: True where drafting stops after this token."""
        if self.kind == "confidence":
            return q.max(dim=-1).values < self.threshold
        if self.kind == "entropy":
            return entropy(q) > self.threshold
        return torch.zeros(q.shape[:-1], dtype=torch.bool)

    def stops_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """As `stops`, from (..., V) raw logits (greedy drafting has no processed q)."""
        return self.stops(torch.softmax(logits.float(), dim=-1))


NEVER_STOP = DraftPolicy("none", 0.0)  # the fixed-γ behaviour: not a tunable default


def entropy(q: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of (..., V) probabilities; zero-probability tokens add 0."""
    return torch.special.entr(q.float()).sum(dim=-1)
