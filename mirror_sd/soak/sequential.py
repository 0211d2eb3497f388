"""The `sequential` run: `--generations` calls of `plan.generate` in a row, each with a random
length and mode, a share `--fault-rate` of the drafting ones given a draft fault (raise and
hang in turn); every output is compared with its reference, RSS and threads are sampled after
every generation."""

from __future__ import annotations

import argparse
import itertools
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass

from mirror_sd.bench.methods import first_difference
from mirror_sd.soak.faults import FAULTS, rearm
from mirror_sd.soak.plans import (
    as_prompt,
    compile_plan,
    explain,
    load_prompts,
    parse_list,
    references,
)
from mirror_sd.soak.report import flatness, plan_info, progress, sample


@dataclass(frozen=True)
class Job:
    index: int
    prompt: int  # index into the prompts
    length: int  # max_new_tokens
    mode: str
    fault: str | None  # raise | hang | None
    after: int  # the draft forward of the generation that faults


def schedule(n: int, prompts: int, lengths: list[int], modes: list[str], fault_rate: float,
             seed: int) -> list[Job]:  # fmt: skip
    """The generations: prompts in rotation; lengths and modes in equal shares, shuffled;
    faults (raise and hang in turn) on a share `fault_rate` of those that draft, at their
    2nd-6th draft forward."""
    rng, kinds = random.Random(seed), itertools.cycle(FAULTS)
    picks = [[values[i % len(values)] for i in range(n)] for values in (lengths, modes)]
    for values in picks:
        rng.shuffle(values)
    jobs = []
    for i, (length, mode) in enumerate(zip(*picks, strict=True)):
        faulty = mode != "autoregressive" and rng.random() < fault_rate
        jobs.append(Job(i, i % prompts, length, mode, next(kinds) if faulty else None,
                        rng.randint(2, 6)))  # fmt: skip
    return jobs


def run_sequential(args: argparse.Namespace) -> dict:
    plan, draft = compile_plan(args)
    try:
        prompts, lengths = load_prompts(args), parse_list(args.lengths, int)
        refs = references(plan, prompts, lengths, ("chat",))
        jobs = schedule(args.generations, len(prompts), lengths,
                        parse_list(args.modes, str), args.fault_rate, args.seed)  # fmt: skip
        rows, mismatches, lost, faults, samples = [], [], [], [], [sample(i=-1, t=0.0)]
        start = time.monotonic()
        for job in jobs:
            if job.fault:
                draft.arm(job.fault, job.after)
            t0 = time.perf_counter()
            try:
                res = plan.generate(as_prompt("chat", prompts[job.prompt]), job.length,
                                    mode=job.mode)  # fmt: skip
            except Exception as exc:  # a lost generation: recorded, the soak goes on
                res = None
                lost.append({**asdict(job), "error": f"{type(exc).__name__}: {exc}"})
            wall = time.perf_counter() - t0
            draft.disarm()
            fired = job.fault is not None and draft.fired_at is not None
            disabled = rearm(plan, draft) if fired or plan.draft_disabled else False
            fallback = res.stats.fallback if res is not None else None
            if fired:
                seen = fallback is not None and (job.fault != "hang" or disabled)
                faults.append({"i": job.index, "kind": job.fault, "t": round(time.monotonic()
                               - start, 2), "fallback": fallback, "seen": seen})  # fmt: skip
            ref = refs[("chat", job.prompt, job.length)]
            if res is not None and res.tokens != ref.tokens:
                mismatches.append({**asdict(job), "first_difference":
                                   first_difference(res.tokens, ref.tokens),
                                   "got": list(res.tokens), "expected": ref.tokens})  # fmt: skip
            rows.append({**asdict(job), "fired": fired, "fallback": fallback, "wall_s":
                         round(wall, 3), "tokens": len(res.tokens) if res else None})  # fmt: skip
            samples.append(sample(i=job.index, t=round(time.monotonic() - start, 2)))
            progress(args, job.index + 1, len(jobs), len(mismatches), len(lost))
        explain(plan, mismatches, refs)
        counts = sequential_counts(rows, mismatches, lost, faults)
        return {"kind": "sequential", "plan": plan_info(plan), "counts": counts,
                "ok": not (lost or mismatches or counts["faults_unseen"]),
                "mismatches": mismatches, "lost": lost, "faults": faults, "samples": samples,
                "flatness": flatness(samples[1:], "i", 100, "MiB per 100 generations"),
                "generations": rows, "x": "i"}  # fmt: skip
    finally:
        plan.close()


def sequential_counts(rows, mismatches, lost, faults) -> dict:
    planned = Counter(r["fault"] for r in rows if r["fault"])
    return {
        "generations": len(rows), "identical": len(rows) - len(mismatches) - len(lost),
        "changed": len(mismatches), "lost": len(lost),
        "by_mode": dict(Counter(r["mode"] for r in rows)),
        "faults_planned": dict(planned),
        "faults_fired": dict(Counter(f["kind"] for f in faults)),
        "faults_unseen": sum(not f["seen"] for f in faults),
        "fallbacks": sum(r["fallback"] is not None for r in rows),
        "spontaneous_fallbacks": sum(r["fallback"] is not None and not r["fired"] for r in rows),
    }  # fmt: skip
