"""`Profile`: the timings and agreements one (target device, draft device) pair measured
(runtime/profiling.py measures one; a sim device reads one from JSON), and the streamed
chain's expected time it prices. Pure data; the latency model that reads it is
`partition.cost_model`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

PROFILE_VERSION = 1


@dataclass(frozen=True)
class Profile:
    """Measured timings of one (target device, draft device) pair; seconds throughout.

    Attributes:
        num_layers: N, the target's layer count.
        t_target: n -> full target forward on n new rows (n = 1..16; must include 1).
        t_draft: b -> one draft step over b branch rows (must include 1).
        t_exit_head: the exit head on γ+1 rows (target device).
        t_chan: token channel latency, target -> draft device.
        t_sync: rendezvous overhead per round (verdict -> branch lookup -> next round).
        accept_rate: measured per-token acceptance α in [0, 1], or None (then ASSUMED).
        overlap_slowdown: f >= 1, how much longer target and draft steps take while both
            pipelines run at once (1 for devices with their own cores and memory; on one CPU
            package both share the memory bus). Stretches the overlapped suffix and rollouts.
        hit_rate_by_exit_layer: ℓe -> measured probability that the exit head's top-1 token
            at ℓe equals the target's token (logit-lens agreement); the rank model below turns
            it into top-κ coverage. Empty: `ASSUMED_AGREEMENT_BY_DEPTH` is used.
        description: free text (machine, models, dtype).
        stream_accuracy: the draft's stream rows (speculative streaming): held-out accuracy of
            stream j's guess of the draft's own token, j = 1..k; empty: no stream rows. The
            chain then costs `chain(γ)` (the cheaper of streamed and one token per step).
        sibling_coverage: β_s for s = 1, 2, ...: the probability that the target's token is
            among the draft's next s best tokens when it is not the draft's first choice
            (teacher-forced on the calibration text); empty: not measured. Sizes a
            speculative round's token tree (`partition.tree_shape`).
        retrieval_source: the draft-free retrieval source `retrieval_rounds` ran ("" none).
        retrieval_rounds: (rows verified, tokens committed) of each greedy round that source
            makes alone (the draft idle) over the target's own answer to the acceptance
            prompt: its speedup is predicted from these rounds and t_T, not from α
            (`retrieval_speedup`); empty: not measured, not a candidate of mode auto.
    """

    num_layers: int
    t_target: dict[int, float]
    t_draft: dict[int, float]
    t_exit_head: float = 0.0
    t_chan: float = 0.0
    t_sync: float = 0.0
    accept_rate: float | None = None
    hit_rate_by_exit_layer: dict[int, float] = field(default_factory=dict)
    description: str = ""
    overlap_slowdown: float = 1.0
    stream_accuracy: tuple[float, ...] = ()
    sibling_coverage: tuple[float, ...] = ()
    retrieval_source: str = ""
    retrieval_rounds: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or self.num_layers < 2:
            raise ValueError(f"profile num_layers must be an integer >= 2, got {self.num_layers!r}")
        for name in ("t_target", "t_draft"):
            table = getattr(self, name)
            if 1 not in table or any(k < 1 or v <= 0 for k, v in table.items()):
                raise ValueError(f"profile {name} needs positive times for n >= 1, n = 1 included")
        if self.overlap_slowdown < 1:
            raise ValueError(f"profile overlap_slowdown must be >= 1, got {self.overlap_slowdown}")
        for name in ("t_exit_head", "t_chan", "t_sync"):
            if getattr(self, name) < 0:
                raise ValueError(f"profile {name} must be >= 0, got {getattr(self, name)}")
        if self.accept_rate is not None and not 0 <= self.accept_rate <= 1:
            raise ValueError(f"profile accept_rate must be in [0, 1], got {self.accept_rate}")
        cov = self.sibling_coverage
        if any(not 0 <= c <= 1 for c in cov) or any(a > b for a, b in itertools.pairwise(cov)):
            raise ValueError(
                f"profile sibling_coverage must be non-decreasing values in [0, 1], got {cov}"
            )
        if any(not 1 <= tokens <= rows for rows, tokens in self.retrieval_rounds):
            raise ValueError(
                "profile retrieval_rounds must be (rows, tokens) pairs with 1 <= tokens <= rows"
            )
        for layer, rate in self.hit_rate_by_exit_layer.items():
            if not 1 <= layer < self.num_layers or not 0 <= rate <= 1:
                raise ValueError(
                    f"profile hit_rate_by_exit_layer[{layer}] = {rate}: need 1 <= layer <= "
                    f"{self.num_layers - 1} and a rate in [0, 1]"
                )

    def target(self, n: int) -> float:
        """t_T(n), linearly interpolated between measured n. Raises ValueError outside them."""
        return interpolate(self.t_target, n, "t_target")

    def draft(self, b: int) -> float:
        """t_d(b), linearly interpolated between measured b. Raises ValueError outside them."""
        return interpolate(self.t_draft, b, "t_draft")

    def chain(self, gamma: int) -> float:
        """Expected time of the draft's chain of γ tokens: γ one-row steps, or, with stream
        rows, the streamed chain when it is predicted cheaper (`streams_pay`)."""
        plain = gamma * self.draft(1)
        if not self.stream_accuracy:
            return plain
        return min(plain, streamed_chain_time(gamma, self.stream_accuracy, self.draft))

    def streams_pay(self, gamma: int) -> bool:
        """Does the streamed chain beat γ one-row steps at this γ (by the measured t_d(rows))?"""
        return bool(self.stream_accuracy) and streamed_chain_time(
            gamma, self.stream_accuracy, self.draft
        ) < gamma * self.draft(1)

    def retrieval_speedup(self, batch: int = 1) -> float:
        """Predicted speedup over autoregressive of `retrieval_rounds` with `batch` sequences
        live: their tokens at t_T(batch) each over their blocks' t_T(batch·rows); 0.0 when
        not measured."""
        if not self.retrieval_rounds:
            return 0.0
        tokens = sum(n for _, n in self.retrieval_rounds)
        blocks = sum(self.target(batch * r) for r, _ in self.retrieval_rounds)
        return tokens * self.target(batch) / blocks

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (table keys become strings)."""
        d = asdict(self)
        for name in ("t_target", "t_draft", "hit_rate_by_exit_layer"):
            d[name] = {str(k): v for k, v in sorted(d[name].items())}
        return {"version": PROFILE_VERSION, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Inverse of `to_dict`. Raises ValueError on a wrong version or unknown keys."""
        data = dict(data)
        if data.pop("version", None) != PROFILE_VERSION:
            raise ValueError(f"profile: expected `version: {PROFILE_VERSION}`")
        valid = set(cls.__dataclass_fields__)
        if set(data) - valid:
            raise ValueError(
                f"profile: unknown keys {sorted(set(data) - valid)}; valid: {sorted(valid)}"
            )
        for name in ("t_target", "t_draft", "hit_rate_by_exit_layer"):
            data[name] = {int(k): float(v) for k, v in data.get(name, {}).items()}
        for name in ("stream_accuracy", "sibling_coverage"):
            data[name] = tuple(float(a) for a in data.get(name, ()))
        data["retrieval_rounds"] = tuple(
            (int(r), int(n)) for r, n in data.get("retrieval_rounds", ())
        )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile JSON file. Raises ValueError naming the file when it is malformed."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


def interpolate(table: dict[int, float], x: float, name: str) -> float:
    """table[x], linearly interpolated between its keys; ValueError (naming the profile's
    `name` table) outside them."""
    if x in table:
        return table[x]
    keys = sorted(table)
    if not keys[0] <= x <= keys[-1]:
        raise ValueError(f"profile {name} covers {keys[0]}..{keys[-1]}; {x} needs a measurement")
    hi = next(k for k in keys if k > x)
    lo = max(k for k in keys if k < x)
    return table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)


# --- the latency model (docs/algorithm.md), one formula per function ---------------------------


def streamed_chain_time(gamma: int, accuracy: Sequence[float],
                        t_draft: Callable[[int], float]) -> float:  # fmt: skip
    """Expected time of a streamed chain of γ tokens (docs/algorithm.md, *Multi-token
    drafts*): each forward runs 1 + g + s rows (the picked token, g guesses worth checking, s
    fresh streams) and yields 1 + m tokens, m = the guesses that held in a row; guess i holds
    with probability accuracy[i - 1] once guesses 1..i-1 held (the held-out per-stream
    accuracy, taken as that conditional: optimistic when errors cluster). Fresh guesses exist
    only after every checked guess held. `t_draft(rows)`: one draft forward."""
    k = len(accuracy)

    @cache
    def expect(left: int, g: int) -> float:
        if left <= 0:
            return 0.0
        g = min(g, left - 1)
        s = min(k, left - 1 - g)
        total, p_run = t_draft(1 + g + s), 1.0
        for m in range(g + 1):  # m guesses held, then a miss (or no guess left)
            p = p_run * (1 - accuracy[m]) if m < g else p_run
            nxt = s if m == g else 0
            total += p * expect(left - 1 - m, nxt)
            if m < g:
                p_run *= accuracy[m]
        return total

    return expect(gamma, 0)
