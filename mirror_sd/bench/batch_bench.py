"""`mirror-sd bench --batch 1,2,4`: throughput and latency of batched generation per method.

For each method (`ar`, `speculative`, `mirror`) and batch size B the prompts run in consecutive groups of
B (the last group may be smaller). Per (method, B): total tokens/s (all new tokens over the
summed group wall times), mean and worst per-sequence latency (a sequence's time until it left
its batch), the share of the time spent realigning (compactions) and how many sequences are
identical to their batch-1 output of the same method and to the batch-1 `ar` output (the
target's own decoding). Batch 1 is the plain single-prompt path, so B > 1 rows compare against
exactly what `plan.generate(prompt)` gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BatchRow:
    method: str
    batch: int
    sequences: int
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    mean_latency_s: float  # per sequence: until it left its batch
    max_latency_s: float
    realign_share: float  # compaction time / wall time
    identical_to_batch1: int  # sequences equal to this method's batch-1 output
    identical_to_ar: int  # sequences equal to batch-1 `ar` (the target's own decoding)


def parse_sizes(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; ValueError naming the flag for anything but positive ints."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"--batch {text!r}: expected positive integers, e.g. 1,2,4")
    return sizes


def run(
    plan, prompts: Sequence[list[int]], sizes: Sequence[int], max_new_tokens: int,
    methods: Sequence[str] = ("ar", "speculative", "mirror"), eos: Sequence[int] = (),
) -> list[BatchRow]:  # fmt: skip
    """Run every (method, batch size) over `prompts` (token ids) on `plan`.

    Raises:
        ValueError: a method that is not a plan method (`methods.PLAN_METHODS`: modes, retrieval
            sources, draft-length policies, the SAM hybrid, ...).
    """
    from mirror_sd.bench.methods import PLAN_METHODS

    unknown = [m for m in methods if m not in PLAN_METHODS]
    if unknown:
        raise ValueError(f"batch bench methods {unknown}: expected plan methods "
                         f"({', '.join(PLAN_METHODS)})")  # fmt: skip
    kw = {
        m: {"eos_token_id": list(eos), **PLAN_METHODS[m]} for m in dict.fromkeys(["ar", *methods])
    }
    single = {m: [plan.generate(p, max_new_tokens, **kw[m]) for p in prompts] for m in kw}
    rows = []
    for method in methods:
        for b in sizes:
            if b == 1:  # the single-prompt path itself
                results, realign = single[method], 0.0
                walls = [r.stats.wall_s for r in results]
            else:
                results, walls, realign = [], [], 0.0
                for k in range(0, len(prompts), b):
                    group = plan.generate(list(prompts[k : k + b]), max_new_tokens,
                                          **kw[method])  # fmt: skip
                    results += group
                    walls.append(group[0].batch.wall_s)
                    realign += group[0].batch.realign_s
            rows.append(_row(method, b, results, walls, realign, single))
    return rows


def _row(method, b, results, walls, realign, single) -> BatchRow:
    wall = sum(walls)
    tokens = sum(len(r.tokens) for r in results)
    latency = [r.stats.wall_s for r in results]
    same = lambda ref: sum(r.tokens == s.tokens for r, s in zip(results, ref, strict=True))  # noqa: E731
    return BatchRow(
        method, b, len(results), tokens, wall, tokens / wall if wall > 0 else 0.0,
        sum(latency) / len(latency), max(latency), realign / wall if wall > 0 else 0.0,
        same(single[method]), same(single["ar"]),
    )  # fmt: skip


def markdown(rows: Sequence[BatchRow]) -> str:
    """A table: one line per (method, B), with the throughput gain over that method's B = 1."""
    base = {r.method: r.tokens_per_s for r in rows if r.batch == 1}
    lines = [
        "| method | B | tok/s | × B=1 | mean latency s | max latency s | realign | "
        "identical to B=1 | identical to ar |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        gain = f"{r.tokens_per_s / base[r.method]:.2f}" if base.get(r.method) else "n/a"
        lines.append(
            f"| {r.method} | {r.batch} | {r.tokens_per_s:.1f} | {gain} | {r.mean_latency_s:.2f} "
            f"| {r.max_latency_s:.2f} | {r.realign_share:.1%} | {r.identical_to_batch1}/"
            f"{r.sequences} | {r.identical_to_ar}/{r.sequences} |"
        )
    return "\n".join(lines)


def to_json(rows: Sequence[BatchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
