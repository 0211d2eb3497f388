"""The `replay` run: a Spec-Bench run's questions through the OpenAI-compatible server, from
`--clients` threads at once, each answer checked against the run's `ar` output (the target's
own greedy decoding), so that lossless identity is shown batched and through the server (#26).

A `mirror-sd bench --out RUN` folder's records.jsonl holds, per question, every method's token
ids; its runs disable EOS (every method makes exactly max_new_tokens), while the server stops
at EOS. So a question's expected answer is its `ar` tokens cut after the first EOS id, decoded
as the server decodes a generation (`skip_special_tokens=True`, the EOS token kept in the
tokens and so in `usage.completion_tokens`), with finish_reason "stop" (EOS) or "length".
Requests ask for `return_token_ids`, so an answer is identical when its token ids are those
tokens and its text that decoding.

Before serving, the plan decodes the first reference question target-only with EOS off: it
must give the reference's `ar` tokens, or the reference was made with another plan (exit 2).
Each finished request is appended to OUT/replay_records.jsonl at once (`--resume` skips the
questions it holds); OUT/replay.json and replay.md are written at the end.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from mirror_sd.bench.jsonl import first_pass_records, read_jsonl
from mirror_sd.bench.methods import first_difference
from mirror_sd.bench.runner import load_average, machine_info, versions
from mirror_sd.bench.specbench import SpecBenchNotFoundError, load_questions
from mirror_sd.runtime.prompts import encode_prompt, eos_token_ids
from mirror_sd.serve.config import ServeConfig
from mirror_sd.serve.server import ServerThread
from mirror_sd.soak.faults import metric, scrape
from mirror_sd.soak.plans import Reference, compile_plan, explain
from mirror_sd.soak.report import plan_info, progress
from mirror_sd.soak.traffic import ENDPOINTS, REQUEST_TIMEOUT_S

SCHEMA = "mirror-sd-soak-replay/1"
JOURNAL = "replay_records.jsonl"  # one line per finished request: --resume
ALL_QUESTIONS = 10**9  # load_questions' per_category: every question of each task


class ReplayError(ValueError):
    """The reference cannot be replayed on this plan (the CLI exits 2 with the message)."""


@dataclass(frozen=True)
class Question:
    """One reference question and the server answer it must get."""

    question_id: int
    task: str
    category: str
    text: str  # the first turn, sent as the one user message
    prompt: list[int]  # its prompt ids, as the bench encoded them (chat template applied)
    ar: list[int]  # the reference's `ar` tokens (EOS off)
    tokens: list[int]  # `ar` cut after the first EOS: what the server generates
    answer: str  # `tokens` decoded as the server decodes them
    finish_reason: str  # "stop" (an EOS ended it) or "length"


def load_reference(run_dir: Path) -> list[dict]:
    """The `ar` records (first pass) of a `mirror-sd bench --out` folder, in question order.
    A line an interruption cut short (a run still writing) is skipped.

    Raises:
        ReplayError: no records.jsonl there, or no `ar` record in it.
    """
    try:
        records = first_pass_records(run_dir)
    except ValueError as e:
        raise ReplayError(str(e)) from None
    found: dict[int, dict] = {}
    for r in records:
        if r.get("method") == "ar":
            found.setdefault(int(r["question_id"]), r)
    if not found:
        raise ReplayError(f"--reference {run_dir}: records.jsonl holds no `ar` record; run "
                          "the reference with `--methods ar,...`")  # fmt: skip
    return list(found.values())


def parse_ids(spec: str) -> set[int]:
    """`--question-ids` ("460-560", "81,90-95"): the Spec-Bench question ids it names.

    Raises:
        ReplayError: a part is not an id or an ascending range A-B.
    """
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            a, b = 1, 0
        if a > b or a < 0:
            raise ReplayError(f"--question-ids {spec}: {part!r} is not a question id or a "
                              "range A-B with A <= B (e.g. 460-560,81)")  # fmt: skip
        ids.update(range(a, b + 1))
    return ids


def select(records: list[dict], spec: str | None) -> list[dict]:
    """The reference records whose question id `--question-ids` names (all without it): a
    run resumed on another machine replays here only the part this machine's plan made.

    Raises:
        ReplayError: no reference question has one of those ids.
    """
    if spec is None:
        return records
    ids = parse_ids(spec)
    kept = [r for r in records if int(r["question_id"]) in ids]
    if not kept:
        have = sorted(int(r["question_id"]) for r in records)
        raise ReplayError(f"--question-ids {spec}: the reference holds none of them (its "
                          f"questions: {have[0]}..{have[-1]}, {len(have)} in all)")  # fmt: skip
    return kept


def expected_answer(tokenizer, ar: list[int], eos: set[int]) -> tuple[list[int], str, str]:
    """(tokens, text, finish_reason) of the server's answer when the plan generates `ar`: the
    tokens up to and including the first EOS id (the server keeps it, and counts it), decoded
    with `skip_special_tokens=True`; "stop" when an EOS ended it, else "length"."""
    end = next((i for i, t in enumerate(ar) if t in eos), None)
    tokens = list(ar if end is None else ar[: end + 1])
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return tokens, text, "length" if end is None else "stop"


def questions_of(plan, records: list[dict], path: str | None) -> list[Question]:
    """The reference's questions with their prompts and expected answers.

    Raises:
        ReplayError: the question file lacks a reference question, or a prompt does not
            encode to the reference's `prompt_tokens` (another question file or tokenizer).
    """
    try:
        text = {q.question_id: q for q in load_questions(path, per_category=ALL_QUESTIONS)}
    except (SpecBenchNotFoundError, ValueError) as exc:
        raise ReplayError(f"--questions: {exc}") from None
    eos = eos_token_ids(plan.tokenizer, plan.generation_config)
    out = []
    for r in records:
        q = text.get(int(r["question_id"]))
        if q is None:
            raise ReplayError(f"--reference: question {r['question_id']} is not in the question "
                              "file; pass the reference's --questions")  # fmt: skip
        prompt = encode_prompt(plan.tokenizer, q.text, chat=True)
        if "prompt_tokens" in r and len(prompt) != r["prompt_tokens"]:
            raise ReplayError(f"--reference: question {q.question_id} encodes to {len(prompt)} "
                              f"prompt tokens here, {r['prompt_tokens']} in the reference; pass "
                              "its --questions and --target (tokenizer)")  # fmt: skip
        tokens, answer, reason = expected_answer(plan.tokenizer, list(r["tokens"]), eos)
        out.append(Question(q.question_id, r.get("task", q.task), r.get("category", q.category),
                            q.text, prompt, list(r["tokens"]), tokens, answer, reason))  # fmt: skip
    return out


def check_plan(plan, q: Question) -> dict:
    """Decode `q` target-only, EOS off, as the reference's `ar` did; returns what was checked.

    Raises:
        ReplayError: the tokens are not the reference's (it was made with another plan).
    """
    res = plan.generate(q.prompt, len(q.ar), mode="autoregressive", eos_token_id=[])
    at = first_difference(list(res.tokens), q.ar)
    if at is not None:
        raise ReplayError(
            f"--reference was made with another plan: this plan's target-only greedy output on "
            f"question {q.question_id} parts from the reference's `ar` at new token {at}; pass "
            "the flags of the run that made it (--target, --draft, --device-map, --max-len and "
            "the speculation settings of its `mirror-sd bench` command)"
        )
    return {"question_id": q.question_id, "tokens": len(q.ar), "identical": True}


def ask(http: httpx.Client, url: str, model: str, endpoint: str, q: Question,
        stream: bool) -> dict:  # fmt: skip
    """One greedy request for `q`: {status, text, token_ids, finish_reason, usage} or
    {status, error}."""
    body = {"model": model, "max_tokens": len(q.ar), "temperature": 0, "return_token_ids": True}
    chat = endpoint == "chat"
    body.update({"messages": [{"role": "user", "content": q.text}]} if chat else
                {"prompt": q.text})  # fmt: skip
    path = url + ENDPOINTS[endpoint]
    if not stream:
        r = http.post(path, json=body)
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.text[:500]}
        doc = r.json()
        choice = doc["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return {"status": 200, "text": text, "finish_reason": choice["finish_reason"],
                "token_ids": choice.get("token_ids"), "usage": doc.get("usage")}  # fmt: skip
    body.update(stream=True, stream_options={"include_usage": True})
    parts, reason, usage, ids = [], None, None, None
    with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.read().decode(errors="replace")[:500]}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return {"status": 200, "text": "".join(parts), "finish_reason": reason,
                        "token_ids": ids, "usage": usage}  # fmt: skip
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                return {"status": 200, "error": f"error event: {event['error'].get('message')}"}
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
                reason = choice.get("finish_reason") or reason
                ids = choice.get("token_ids", ids)
    return {"status": 200, "error": "stream ended without [DONE]"}


class Journal:
    """The finished requests' rows: kept in memory and appended to the journal file at once."""

    def __init__(self, path: Path, rows: list[dict]):
        self.path, self.rows = path, list(rows)
        self._lock = threading.Lock()

    def add(self, row: dict) -> None:
        with self._lock, self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            self.rows.append(row)

    @staticmethod
    def read(path: Path) -> list[dict]:
        """The journal's rows (a line cut short by an interruption: asked again)."""
        return read_jsonl(path)


def judge(q: Question, got: dict, streamed: bool, client: int, wall: float) -> dict:
    """The journal row of one request: identical (its token ids and text are the expected
    answer's), changed, or lost (a non-200, an error event, a stream without [DONE], no
    answer)."""
    row = {"question_id": q.question_id, "task": q.task, "category": q.category,
           "streamed": streamed, "client": client, "wall_s": round(wall, 3),
           "status": got.get("status")}  # fmt: skip
    if "error" in got:
        return {**row, "outcome": "lost", "identical": False, "error": got["error"]}
    usage = got.get("usage") or {}
    row.update(finish_reason=got["finish_reason"], prompt_tokens=usage.get("prompt_tokens"),
               completion_tokens=usage.get("completion_tokens"))  # fmt: skip
    row["identical"] = got["text"] == q.answer and got.get("token_ids") == q.tokens
    row["outcome"] = "identical" if row["identical"] else "changed"
    if not row["identical"]:
        row.update(got=got["text"], expected=q.answer, got_token_ids=got.get("token_ids"))
    if got["finish_reason"] != q.finish_reason:
        row["expected_finish_reason"] = q.finish_reason
    if (row["prompt_tokens"], row["completion_tokens"]) != (len(q.prompt), len(q.tokens)):
        row["expected_usage"] = [len(q.prompt), len(q.tokens)]
    return row


def client_loop(c: int, url: str, model: str, endpoint: str, jobs: queue.Queue,
                journal: Journal, args: argparse.Namespace, total: int) -> None:  # fmt: skip
    """Take (question, streamed) jobs off the shared queue until it is empty."""
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
        while True:
            try:
                q, streamed = jobs.get_nowait()
            except queue.Empty:
                return
            t0 = time.monotonic()
            try:
                got = ask(http, url, model, endpoint, q, streamed)
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                got = {"status": None, "error": f"{type(exc).__name__}: {exc}"}
            journal.add(judge(q, got, streamed, c, time.monotonic() - t0))
            outcomes = Counter(r["outcome"] for r in list(journal.rows))
            progress(args, len(journal.rows), total, outcomes["changed"], outcomes["lost"])


def serve_all(plan, args: argparse.Namespace, endpoint: str, todo: list[tuple[Question, bool]],
              journal: Journal, total: int) -> dict:  # fmt: skip
    """Serve the plan on a free loopback port; `--clients` threads ask every job in `todo`.
    Returns what the server's /metrics says of the batches it ran (`batching`)."""
    jobs: queue.Queue = queue.Queue()
    for job in todo:
        jobs.put(job)
    model = Path(args.target).name
    config = ServeConfig(model, port=0, engine="batch", prefix_cache=args.prefix_cache)
    with ServerThread(plan, config) as server:
        clients = [threading.Thread(target=client_loop, name=f"soak-replay-client-{c}",
                                    args=(c, server.url, model, endpoint, jobs, journal, args,
                                          total), daemon=True)
                   for c in range(max(1, min(args.clients, len(todo))))]  # fmt: skip
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        return batching(scrape(server.url.removesuffix("/v1")))


def batching(m: dict) -> dict:
    """The batch engine's rounds, how many held more than one sequence, the mean batch size, and
    the draft's proposed / accepted tokens and fallbacks (did batched requests really draft?)."""
    rounds, single = metric(m, "batch_size_count"), metric(m, "batch_size_bucket", le="1.0")
    return {"batch_rounds": rounds, "rounds_batched": rounds - single,
            "mean_batch_size": round(metric(m, "batch_size_sum") / rounds, 2) if rounds else 0.0,
            "drafted_tokens": metric(m, "drafted_tokens_total"),
            "accepted_draft_tokens": metric(m, "accepted_draft_tokens_total"),
            "draft_fallbacks": metric(m, "draft_fallbacks_total")}  # fmt: skip


def run_replay(args: argparse.Namespace, command: str) -> int:
    """The `replay` sub-command: returns the exit code (0: nothing lost or changed; 1; 2: the
    reference cannot be replayed on this plan, the message on stderr)."""
    machine, t0 = machine_info(), time.monotonic()
    start = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        records = select(load_reference(args.reference), args.question_ids)
    except ReplayError as exc:
        return _error(exc)
    plan, _ = compile_plan(args)  # the draft's FaultyDraft stays unarmed: no faults here
    try:
        try:
            questions = questions_of(plan, records, args.questions)
            checked = check_plan(plan, questions[0])
        except ReplayError as exc:
            return _error(exc)
        questions = questions[: args.limit] if args.limit else questions
        endpoint = "chat" if plan.tokenizer.chat_template else "completion"
        journal, asked, served = replay(plan, args, questions, endpoint)
        changed = explained(plan, questions, journal.rows, endpoint)
        info = plan_info(plan)
    finally:
        plan.close()
    machine["load_average_at_end"] = load_average()
    order = {q.question_id: i for i, q in enumerate(questions)}
    rows = sorted(journal.rows, key=lambda r: order[r["question_id"]])
    finish = datetime.now(timezone.utc).isoformat(timespec="seconds")
    doc = {"schema": SCHEMA, "kind": "replay", "command": command,
           "date": {"start": start, "finish": finish}, "wall_s": round(time.monotonic() - t0, 1),
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                        if not k.startswith("_")},
           "reference": {"folder": str(args.reference), "records": len(records),
                         "max_new_tokens": sorted({len(q.ar) for q in questions})},
           "endpoint": f"/v1{ENDPOINTS[endpoint]}", "machine": machine, "versions": versions(),
           "plan": info, "plan_check": checked, "counts": counts(questions, rows, asked),
           "server_metrics": served,
           "mismatches": changed, "lost": [r for r in rows if r["outcome"] == "lost"],
           "journal": JOURNAL}  # fmt: skip
    c = doc["counts"]
    doc["ok"] = c["answered"] == c["identical"] == c["questions"] and not c["lost"]
    (args.out / "replay.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    text = markdown(doc)
    (args.out / "replay.md").write_text(text)
    print(text)
    return 0 if doc["ok"] else 1


def replay(plan, args: argparse.Namespace, questions: list[Question],
           endpoint: str) -> tuple[Journal, int, dict]:  # fmt: skip
    """Ask every question the journal does not hold (`--resume`; without it the journal is
    cleared first); returns the journal, how many were asked now and `batching` of this
    process's server ({} when nothing was left to ask). Whether a question is
    streamed is drawn per question in order from `--seed`, so a resumed run draws the same."""
    rng = random.Random(args.seed)
    streamed = {q.question_id: rng.random() < args.stream_rate for q in questions}
    path = args.out / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        path.unlink(missing_ok=True)
    wanted = {q.question_id for q in questions}
    kept = {r["question_id"]: r for r in Journal.read(path) if r.get("question_id") in wanted}
    journal = Journal(path, list(kept.values()))
    todo = [(q, streamed[q.question_id]) for q in questions if q.question_id not in kept]
    served = serve_all(plan, args, endpoint, todo, journal, len(questions)) if todo else {}
    return journal, len(todo), served


def explained(plan, questions: list[Question], rows: list[dict], endpoint: str) -> list[dict]:
    """The changed answers, each with `explain`'s first difference (in reference tokens) and
    the target's top-2 logit margin there. Runs the plan's target: the server must be closed."""
    refs = {(endpoint, q.question_id, len(q.ar)): Reference(q.prompt, q.tokens, q.answer)
            for q in questions}  # fmt: skip
    length = {q.question_id: len(q.ar) for q in questions}
    changed = [{**r, "kind": endpoint, "prompt": r["question_id"],
                "length": length[r["question_id"]]}
               for r in rows if r["outcome"] == "changed"]  # fmt: skip
    explain(plan, changed, refs)
    return [{k: v for k, v in m.items() if k not in ("kind", "prompt", "length")} for m in changed]


def counts(questions: list[Question], rows: list[dict], asked: int) -> dict:
    """Outcomes over the rows (one per question), by task and by streamed."""

    def tally(rs: list[dict]) -> dict:
        o = Counter(r["outcome"] for r in rs)
        return {"requests": len(rs), "identical": o["identical"], "changed": o["changed"],
                "lost": o["lost"]}  # fmt: skip

    o = Counter(r["outcome"] for r in rows)
    tasks = dict.fromkeys(q.task for q in questions)
    return {"questions": len(questions), "asked_now": asked, "resumed": len(rows) - asked,
            "answered": o["identical"] + o["changed"], "identical": o["identical"],
            "changed": o["changed"], "lost": o["lost"], "missing": len(questions) - len(rows),
            "finish_reason_differs": sum("expected_finish_reason" in r for r in rows),
            "usage_differs": sum("expected_usage" in r for r in rows),
            "by_task": {t: tally([r for r in rows if r["task"] == t]) for t in tasks},
            "by_streamed": {k: tally([r for r in rows if r["streamed"] == s])
                            for k, s in (("streamed", True), ("whole", False))}}  # fmt: skip


def markdown(doc: dict) -> str:
    """replay.md: what ran, the verdict and a small table."""
    c, m, s, ref = doc["counts"], doc["machine"], doc["settings"], doc["reference"]

    def each(tallies: dict) -> str:
        return ", ".join(f"{k} {v['identical']}/{v['requests']}" for k, v in tallies.items())

    rows = [("verdict", "PASS" if doc["ok"] else "FAIL"),
            ("questions (asked now / from the journal)",
             f"{c['questions']} ({c['asked_now']} / {c['resumed']})"),
            ("answered, identical to the reference's `ar`", c["identical"]),
            ("changed", c["changed"]), ("lost", c["lost"]),
            ("identical by task", each(c["by_task"])),
            ("identical, streamed / whole", each(c["by_streamed"])),
            ("finish_reason / usage differs",
             f"{c['finish_reason_differs']} / {c['usage_differs']}")]  # fmt: skip
    parts = [f"q{x['question_id']}: token {x['first_difference']}, margin {x['margin']:.3g}"
             for x in doc["mismatches"] if "margin" in x]  # fmt: skip
    if b := doc["server_metrics"]:
        rows.append(
            (
                "server rounds, with 2+ sequences (mean batch size)",
                f"{b['batch_rounds']:.0f}, {b['rounds_batched']:.0f} ({b['mean_batch_size']})",
            )
        )
        rows.append(("draft tokens proposed / accepted (draft fallbacks)",
                     f"{b['drafted_tokens']:.0f} / {b['accepted_draft_tokens']:.0f} "
                     f"({b['draft_fallbacks']:.0f})"))  # fmt: skip
    if parts:
        rows.append(("where changed answers part (target's top-2 margin)", "; ".join(parts[:10])))
    head = (f"# Soak: replay\n\n{doc['date']['start']}, {m['cpu']} ({m['cores']} cores), load "
            f"average {m['load_average_at_start']} -> {m['load_average_at_end']}, "
            f"{doc['wall_s']:.0f} s\n\n`{doc['command']}`\n\nReference `{ref['folder']}` "
            f"({ref['records']} questions; {ref['max_new_tokens']} new tokens) through "
            f"`{doc['endpoint']}` from {s['clients']} clients, stream rate {s['stream_rate']}, "
            f"prefix cache {'on' if s['prefix_cache'] else 'off'}, mode {s['mode']}\n\n"
            "| | |\n| --- | --- |\n")  # fmt: skip
    return head + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _error(exc: Exception) -> int:
    print(f"scripts/soak.py: error: {exc}", file=sys.stderr)
    return 2
