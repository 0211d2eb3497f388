"""`mirror-sd bench --batch 1,2,4`: throughput and latency of batched generation per method.

For each method (`ar`, `speculative`, `mirror`) and batch size B the prompts run in consecutive groups of
B (the last group may be smaller). Per (method, B): total tokens/s (all new tokens over the
summed group wall times), mean and worst per-sequence latency (a sequence's time until it left
its batch), the share of the time spent realigning (compactions) and how many sequences are
identical to their batch-1 output of the same method and to the batch-1 `ar` output (the
target's own decoding). Batch 1 is the plain single-prompt path, so B > 1 rows compare against
exactly what `plan.generate(prompt)` gives.

At scale (#26) the batch-1 outputs can come from a finished or resumable Spec-Bench run
(`--reference RUN_DIR`: its records.jsonl holds every method's token ids per question), so only
the batches run; every group is appended to a journal (`batch_records.jsonl`, token ids per
sequence) as soon as it ends, and `--resume` keeps the groups it holds.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mirror_sd.bench.jsonl import first_pass_records, read_jsonl

JOURNAL_FILE = "batch_records.jsonl"  # one line per finished group: --resume


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
    differ_from_ar: tuple[dict, ...] = ()  # {question_id, first_difference} of the others


def parse_sizes(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; ValueError naming the flag for anything but positive ints."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"--batch {text!r}: expected positive integers, e.g. 1,2,4")
    return sizes


def load_reference(run_dir: Path | str) -> dict[str, dict[int, list[int]]]:
    """The batch-1 token ids of a Spec-Bench run (its first pass): {method: {question_id: ids}}.
    Raises ValueError when the folder holds no records.jsonl."""
    ref: dict[str, dict[int, list[int]]] = {}
    for r in first_pass_records(run_dir):
        ref.setdefault(r["method"], {})[r["question_id"]] = r["tokens"]
    return ref


def run(
    plan, prompts: Sequence[list[int]], sizes: Sequence[int], max_new_tokens: int,
    methods: Sequence[str] = ("ar", "speculative", "mirror"), eos: Sequence[int] = (), *,
    ids: Sequence[int] | None = None, reference: dict[str, dict[int, list[int]]] | None = None,
    journal: Path | None = None, resume: bool = False, progress=None,
) -> list[BatchRow]:  # fmt: skip
    """Run every (method, batch size) over `prompts` (token ids; `ids` name them, default
    0..n-1) on `plan`. Without `reference` every method's (and `ar`'s) batch-1 outputs run here;
    with one they are its token ids (truncated to `max_new_tokens`), groups holding a question
    it lacks are skipped, and `ar` runs once on the first question to check that the reference
    was made with this plan. `journal` gets one JSON line per group; `resume` keeps its groups.

    Raises:
        ValueError: a method that is not a plan method (`methods.PLAN_METHODS`: modes, retrieval
            sources, draft-length policies, the SAM hybrid, ...); a reference without one of
            the methods, with EOS on, or made with another plan.
    """
    from mirror_sd.bench.methods import PLAN_METHODS, target_margin
    from mirror_sd.runtime.batch import BatchJob

    unknown = [m for m in methods if m not in PLAN_METHODS]
    if unknown:
        raise ValueError(f"batch bench methods {unknown}: expected plan methods "
                         f"({', '.join(PLAN_METHODS)})")  # fmt: skip
    ids = list(range(len(prompts))) if ids is None else list(ids)
    every = list(dict.fromkeys(["ar", *methods]))
    kw = {m: {"eos_token_id": list(eos), **PLAN_METHODS[m]} for m in every}
    done = _load_journal(journal) if resume and journal is not None else {}
    if journal is not None and not resume:
        journal.unlink(missing_ok=True)

    def group(method: str, b: int, k: int) -> dict:
        key = (method, b, tuple(ids[k : k + b]))
        if key not in done:
            done[key] = _run_group(plan, prompts[k : k + b], ids[k : k + b], method, b,
                                   max_new_tokens, kw[method])  # fmt: skip
            if journal is not None:
                with journal.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
        if progress is not None:
            progress(done[key])
        return done[key]

    for method in methods:  # every batch fits before any runs (PromptTooLongError: a ValueError)
        for b in (b for b in sizes if b > 1):
            for k in range(0, len(prompts), b):
                BatchJob.prepare(plan, list(prompts[k : k + b]), max_new_tokens, **kw[method])
    if reference is None:
        base = {m: _tokens([group(m, 1, k) for k in range(len(prompts))]) for m in every}
        keep = lambda k, b: True  # noqa: E731
    else:
        base = _reference_base(reference, every, ids, max_new_tokens, eos)
        keep = lambda k, b: all(q in base["ar"] for q in ids[k : k + b])  # noqa: E731
        first = next((k for k in range(len(prompts)) if keep(k, 1)), None)
        if first is not None:
            _check_plan(group("ar", 1, first), base["ar"])
    rows = []
    for method in methods:
        for b in sizes:
            groups = [group(method, b, k) for k in range(0, len(prompts), b) if keep(k, b)]
            if groups:
                rows.append(_row(method, b, groups, base))
    for d in (d for r in rows for d in r.differ_from_ar):  # where it parts: a near-tie?
        q, at = d["question_id"], d["first_difference"]
        d.update(target_margin(plan, prompts[ids.index(q)], base["ar"][q][:at]))
    return rows


def _run_group(plan, prompts, ids, method, b, max_new_tokens, kw) -> dict:
    if b == 1:  # the single-prompt path itself
        r = plan.generate(prompts[0], max_new_tokens, **kw)
        results, wall, realign = [r], r.stats.wall_s, 0.0
    else:
        results = plan.generate(list(prompts), max_new_tokens, **kw)
        wall, realign = results[0].batch.wall_s, results[0].batch.realign_s
    return {"method": method, "batch": b, "question_ids": list(ids),
            "tokens": [list(r.tokens) for r in results],
            "latency_s": [r.stats.wall_s for r in results], "wall_s": wall,
            "realign_s": realign,  # who proposed each round's block (target: nobody)
            "sources": dict(Counter(g.source for r in results for g in r.rounds))}  # fmt: skip


def _load_journal(path: Path) -> dict[tuple, dict]:
    """The journal's groups by (method, batch size, question ids); a cut line runs again."""
    return {(g["method"], g["batch"], tuple(g["question_ids"])): g for g in read_jsonl(path)}


def _tokens(groups: Sequence[dict]) -> dict[int, list[int]]:
    return {q: t for g in groups for q, t in zip(g["question_ids"], g["tokens"], strict=True)}


def _reference_base(reference, every, ids, max_new_tokens, eos) -> dict[str, dict[int, list]]:
    if eos:
        raise ValueError("--reference: its runs generate without EOS (equal token counts); "
                         "drop --stop-at-eos")  # fmt: skip
    missing = [m for m in every if m not in reference]
    if missing:
        raise ValueError(f"--reference holds no {', '.join(missing)} records: run the "
                         f"reference with those --methods, or leave them out here")  # fmt: skip
    return {m: {q: t[:max_new_tokens] for q, t in reference[m].items()} for m in every}


def _check_plan(ar: dict, base: dict[int, list[int]]) -> None:
    q, toks = ar["question_ids"][0], ar["tokens"][0]
    if toks != base[q]:
        raise ValueError(f"--reference was made with another plan: this plan's `ar` on question "
                         f"{q} is not the reference's; pass the reference's --target, --draft, "
                         f"--device-map and settings")  # fmt: skip


def _row(method: str, b: int, groups: Sequence[dict], base: dict) -> BatchRow:
    from mirror_sd.bench.methods import first_difference

    wall = sum(g["wall_s"] for g in groups)
    realign = sum(g["realign_s"] for g in groups)
    toks = _tokens(groups)
    latency = [s for g in groups for s in g["latency_s"]]
    tokens = sum(len(t) for t in toks.values())
    same = lambda ref: sum(t == ref.get(q) for q, t in toks.items())  # noqa: E731
    differ = tuple(
        {"question_id": q, "first_difference": first_difference(t, base["ar"][q])}
        for q, t in toks.items() if t != base["ar"][q]
    )  # fmt: skip
    return BatchRow(
        method, b, len(toks), tokens, wall, tokens / wall if wall > 0 else 0.0,
        sum(latency) / len(latency), max(latency), realign / wall if wall > 0 else 0.0,
        same(base[method]), same(base["ar"]), differ,
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
    for r in rows:
        for d in r.differ_from_ar:
            lines.append(f"\n{r.method} at B={r.batch}: question {d['question_id']} parts from "
                         f"`ar` at new token {d['first_difference']}")  # fmt: skip
    return "\n".join(lines)


def to_json(rows: Sequence[BatchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
