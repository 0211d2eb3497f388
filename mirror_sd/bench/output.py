"""What every benchmark method's `generate(ids, n)` returns: ours (methods.py), the
transformers baselines (methods.py) and the peers (peers.py, llamacpp.py) alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Output:
    """One timed generation. Round-level fields are None where a method does not expose them."""

    tokens: list[int]
    wall_s: float
    accept_lengths: list[int] | None = None  # tokens committed per round
    drafted: list[int] | None = None  # tokens proposed per round (draft-length policies)
    round_hits: list[bool | None] | None = None
    round_branches: list[int] | None = None
    round_hit_ranks: list[int | None] | None = None  # mirror: the verdict's branch rank
    rollout_steps: list[int] | None = None  # mirror: batched rollout steps per round
    draft_s: float | None = None
    exposed_draft_s: float | None = None
    hit_rate: float | None = None
    draft_exits: dict[int, int] | None = None  # S2D: draft steps by the layer they stopped after
    trace_path: str | None = None
