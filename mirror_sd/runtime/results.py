"""What a generation returns: tokens, text and per-generation statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mirror_sd.runtime.scheduler import RoundLog


@dataclass(frozen=True)
class GenerationStats:
    mode: str
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    rounds: int
    mean_accepted: float  # tokens committed per round (accepted + correction/bonus)
    mean_drafted: float  # tokens proposed per round (γ unless a draft-length policy stopped early)
    hit_rate: float | None  # fraction of mirror rounds whose verdict matched a rolled-out branch
    draft_s: float  # draft device busy time
    exposed_draft_s: float  # draft time on the critical path
    prefix_s: float
    suffix_s: float
    draft_device: str | None  # which device / EP ran the draft
    fallback: str | None  # why the draft was dropped mid-generation, if it was
    tokens_by_source: dict[str, int]  # committed tokens per proposer of their round's block
    prompt_rows_reused: int = 0  # prompt tokens whose target K/V came from the prefix cache
    # S2D (`draft_exits`): the call's draft forwards by the draft layer count they stopped
    # after (the deepest = ran every layer); a batch's steps are shared, so its whole call's
    draft_exits: dict[int, int] | None = None

    @classmethod
    def from_rounds(cls, mode, rounds: list[RoundLog], new_tokens, wall_s, draft_device, fallback,
                    prompt_rows_reused: int = 0, draft_exits: dict[int, int] | None = None):  # fmt: skip
        mirrored = [r for r in rounds if r.hit is not None]
        return cls(
            mode=mode,
            new_tokens=new_tokens,
            wall_s=wall_s,
            tokens_per_s=new_tokens / wall_s if wall_s > 0 else 0.0,
            rounds=len(rounds),
            mean_accepted=sum(r.committed for r in rounds) / max(1, len(rounds)),
            mean_drafted=sum(r.drafted for r in rounds) / max(1, len(rounds)),
            hit_rate=sum(r.hit for r in mirrored) / len(mirrored) if mirrored else None,
            draft_s=sum(r.t_draft for r in rounds),
            exposed_draft_s=sum(r.exposed for r in rounds),
            prefix_s=sum(r.t_pre for r in rounds),
            suffix_s=sum(r.t_suf for r in rounds),
            draft_device=draft_device,
            fallback=fallback,
            tokens_by_source=_by_source(rounds),
            prompt_rows_reused=prompt_rows_reused,
            draft_exits=draft_exits,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        hit = "n/a" if self.hit_rate is None else f"{self.hit_rate:.0%}"
        line = (
            f"{self.mode}: {self.new_tokens} tokens in {self.wall_s:.2f} s = {self.tokens_per_s:.2f} tok/s; "
            f"{self.rounds} rounds, {self.mean_accepted:.2f} tokens/round "
            f"({self.mean_drafted:.2f} drafted), hit rate {hit}; "
            f"draft {self.draft_s:.2f} s (exposed {self.exposed_draft_s:.2f} s), "
            f"target suffix {self.suffix_s:.2f} s"
        )
        if self.draft_device:
            line += f"; draft on {self.draft_device}"
        if self.draft_exits:
            steps = ", ".join(f"{n} after layer {k}" for k, n in sorted(self.draft_exits.items()))
            line += f"; draft steps: {steps}"
        if self.fallback:
            line += f"; FELL BACK to target-only: {self.fallback}"
        return line


def _by_source(rounds: list[RoundLog]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rounds:
        out[r.source] = out.get(r.source, 0) + r.committed
    return out


@dataclass(frozen=True)
class BatchStats:
    """What a batched `generate` did as a whole (the same record on every result of a batch)."""

    size: int  # sequences in the batch
    new_tokens: int  # over all sequences
    wall_s: float  # until the last sequence finished
    tokens_per_s: float  # total throughput
    rounds: int  # target forwards after the prefills (one per round, all live sequences)
    compactions: int  # realignments of the target's and the draft's packed caches
    moved_rows: int  # cache rows those compactions moved (per layer)
    realign_s: float  # time the rounds spent in them


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]  # new tokens only
    text: str
    prompt_tokens: int
    stats: GenerationStats
    rounds: list[RoundLog]
    trace_path: str | None = None
    batch: BatchStats | None = None  # set on each result of a batched generate
