"""The processes a resumable Spec-Bench run was made by: `OUT/sessions.jsonl`, one line per
`mirror-sd bench` invocation (its start, command, machine, versions and plan), and the index
of that line on every record it timed (`record["session"]`).

A run resumed on another machine can run another plan: `quantize: auto` follows the CPU
(partition/precision.py), and kernels differ between instruction sets, so its questions are
a different model's. Identity still holds per question (every method against that process's
`ar`), but the results must say which questions ran where: `open_session` warns when a
resumed run's machine or plan is not the journal's, and results.json lists every session.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from mirror_sd.bench.jsonl import read_jsonl

SESSIONS_FILE = "sessions.jsonl"
# what makes two sessions the same model on the same kernels (a session's keys)
SAME_RUN_KEYS = (("machine", "cpu"), ("machine", "cpu_flags"), ("plan", "target_device"),
                 ("plan", "draft_device"), ("plan", "exit_layer"))  # fmt: skip


def fingerprint(session: dict) -> dict:
    """The SAME_RUN_KEYS of `session` ("machine.cpu": ..., ...)."""
    return {f"{a}.{b}": session.get(a, {}).get(b) for a, b in SAME_RUN_KEYS}


def open_session(out_dir: Path, entry: dict, resume: bool, resumed_questions: int) -> tuple[
    int, list[dict]
]:  # fmt: skip
    """Append `entry` (this process: started, command, machine, versions, plan) to
    OUT/sessions.jsonl, or start the file afresh without `resume`. Returns (this session's
    index, every session so far). Warns (RuntimeWarning) when resuming a journal made with
    another machine or plan, or one that no sessions.jsonl describes."""
    path = out_dir / SESSIONS_FILE
    if not resume:
        path.unlink(missing_ok=True)
    before = read_jsonl(path)
    mine = fingerprint(entry)
    if resume and resumed_questions and not before:
        warnings.warn(f"--resume: {out_dir} holds {resumed_questions} finished questions but no "
                      f"{SESSIONS_FILE}: the machine and plan they ran on are not recorded",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    for old in before:
        diff = {k: (v, mine[k]) for k, v in fingerprint(old).items() if v != mine[k]}
        if diff and resumed_questions:
            what = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            warnings.warn(
                f"--resume: session {old['session']} of {out_dir} ran on another machine or "
                f"plan ({what}); the questions of the two are different models' (each is still "
                "compared with its own `ar`). results.json lists every session; run on the "
                "same machine and map, or write to another --out, to keep one",
                RuntimeWarning,
                stacklevel=2,
            )
            break
    entry = {"session": len(before), **entry}
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry["session"], [*before, entry]


def session_summary(sessions: list[dict], records: list[dict]) -> list[dict]:
    """Per session: its index, start, CPU, target / draft devices and the questions it timed."""
    return [{"session": s["session"], "started": s.get("started"), **fingerprint(s),
             "questions": len({r["question_id"] for r in records
                               if r.get("session") == s["session"]})}
            for s in sessions]  # fmt: skip
