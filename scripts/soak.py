"""Soak harness (#26, "Evidence at scale"): many generations, and a long server run, while the
draft fails on purpose. Nothing may be lost or changed; memory and threads must stay flat.

    python scripts/soak.py sequential --out soak/sequential [--generations 1000]
    python scripts/soak.py server --out soak/server [--duration 1800] [--clients 8]

Both compile one plan (`--target` / `--draft` default smollm2-135m, `--device-map` and the
speculation flags as `mirror-sd generate` takes them; `--mode` defaults to mirror so that the
draft runs) and wrap its draft runner in `FaultyDraft`, which makes a chosen draft forward raise
(a lost device) or hang past `--draft-timeout`. Prompts rotate over Spec-Bench questions (the
first `--per-category` of each task, chat template applied); every answer is compared with the
target-only greedy output of the same plan for that prompt and length (`mode="autoregressive"`,
computed once per prompt, length and endpoint before the soak starts).

- `sequential`: `--generations` calls of `plan.generate`, each with a random length and mode
  (autoregressive / speculative / mirror, greedy); a share `--fault-rate` of the drafting ones
  gets a fault, raise and hang in turn. RSS and threads are sampled after every generation.
- `server`: the OpenAI-compatible server in-process on a free port; `--clients` threads send
  chat and completion requests of mixed lengths, whole and streamed, close some streams part
  way, and send malformed requests (each must get a 4xx JSON error, never a 5xx). Every
  `--fault-every` seconds the clients pause until the batch has drained, and the next draft
  forward is made to fail: a draft fault drops the draft for the rest of its batch session,
  and under steady load from several clients one session can last the whole run, so without
  the pause only the first fault would hit a running draft. Each fault must show in /metrics
  (`draft_fallbacks_total`, and `draft_disabled` for a hang). RSS and threads are sampled
  every `--sample-every` seconds.

A hung draft is disabled by the plan for good (`plan.draft_disabled`); the harness re-arms it
after each fault (the hung call released, the draft pipeline drained), as an operator
restarting the draft device would, so that every fault hits a live draft.

`--out` gets soak.json (settings, machine, versions, command, counts, every mismatch with the
target's top-2 logit margin where it parts from the reference, faults, samples, flatness),
soak.md (a summary table) and rss_threads.png. The exit code is 0 only when no request was
lost, no output changed and every fault that fired was seen. The server runs without its prefix
cache unless `--prefix-cache`: reused rows may round differently from a fresh prefill, so an
answer can part from the reference at a near-tie (docs/runtime.md, *Prefix caching*; seen on
the int4 smollm2-135m), which the strict comparison counts as a change. docs/soak.md has the
commands of the long runs and how to read the output.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shlex
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import mirror_sd.api as api  # noqa: E402
from mirror_sd import cli  # noqa: E402
from mirror_sd.bench.methods import first_difference, target_margin  # noqa: E402
from mirror_sd.bench.runner import load_average, machine_info, versions  # noqa: E402
from mirror_sd.bench.specbench import load_questions  # noqa: E402
from mirror_sd.devices.base import RunnerWrapper  # noqa: E402
from mirror_sd.runtime.busy import PlanBusyError  # noqa: E402
from mirror_sd.runtime.prompts import encode_prompt  # noqa: E402
from mirror_sd.serve.config import ServeConfig  # noqa: E402
from mirror_sd.serve.server import ServerThread  # noqa: E402

SCHEMA = "mirror-sd-soak/1"
DEFAULT_MODEL = "smollm2-135m"
MODES = ("autoregressive", "speculative", "mirror")
FAULTS = ("raise", "hang")
ENDPOINTS = {"chat": "/chat/completions", "completion": "/completions"}
WARMUP_SHARE = 0.1  # samples in the first tenth of a run are warm-up (caches and pools fill)
REQUEST_TIMEOUT_S = 900.0  # a request not answered within this counts as lost
MAX_EXPLAINED = 20  # changed outputs given the target's margin at their first difference
DRAIN_TIMEOUT_S = 900.0  # the clients' pause before a fault waits at most this long
PROGRESS_S = 30.0  # seconds between progress lines
COLORS = {"raise": "tab:red", "hang": "tab:purple"}


# --- the faulty draft ---------------------------------------------------------------------------
class FaultyDraft(RunnerWrapper):
    """The plan's draft runner, faulting on demand: after `arm(kind, after)` the `after`-th
    forward from then on raises (`raise`: the device is lost) or blocks until `release()` (at
    most `hang_s`) and then completes (`hang`: the scheduler's `draft_timeout_s` expires first).
    Everything else (cache, prefill, threads) is the wrapped runner's."""

    def __init__(self, runner, hang_s: float):
        self.runner, self.hang_s = runner, hang_s
        self._lock = threading.Lock()
        self._armed: tuple[str, int] | None = None
        self.fired_at: float | None = None  # time.monotonic() of the last fault that fired
        self.released = threading.Event()
        self.idle = threading.Event()  # cleared while a hung forward blocks
        self.idle.set()

    def arm(self, kind: str, after: int = 1) -> None:
        with self._lock:
            self._armed, self.fired_at = (kind, after), None
            self.released.clear()

    def disarm(self) -> None:
        """Forget a fault that has not fired (the generation ended first)."""
        with self._lock:
            self._armed = None

    def release(self) -> None:
        """Let a hung forward complete."""
        self.released.set()

    def forward(self, ids, position_ids, mask):
        with self._lock:
            fault = None
            if self._armed is not None:
                kind, left = self._armed
                self._armed = (kind, left - 1) if left > 1 else None
                if left <= 1:
                    fault, self.fired_at = kind, time.monotonic()
        if fault == "raise":
            raise RuntimeError("soak: injected draft fault (the draft device was lost)")
        if fault == "hang":
            self.idle.clear()
            try:
                self.released.wait(self.hang_s)
            finally:
                self.idle.set()
        return self.runner.forward(ids, position_ids, mask)


def install(plan, draft_timeout_s: float) -> FaultyDraft:
    """Wrap the plan's draft runner (before any generation: the runner loops built later use
    the wrapper) and return the wrapper."""
    if plan.draft is None:
        raise ValueError("the soak needs a plan with a draft model: give --draft")
    plan.draft = FaultyDraft(plan.draft, hang_s=max(60.0, 10 * draft_timeout_s))
    return plan.draft


def rearm(plan, draft: FaultyDraft) -> bool:
    """After a fault: release a hung forward, wait until the draft pipeline has run everything
    queued on it, and re-enable a draft the plan disabled for good (it hung), as an operator
    restarting the draft device would. Returns whether the plan had disabled it."""
    draft.release()
    if not draft.idle.wait(draft.hang_s):
        raise RuntimeError("the released draft forward did not return")
    plan.draft_pipe.pool.submit(lambda: None).result(timeout=draft.hang_s)
    disabled = plan.draft_disabled is not None
    plan.draft_disabled = None
    return disabled


# --- plan, prompts, references ------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    prompt: list[int]  # the prompt's token ids, as the plan encodes them
    tokens: list[int]
    text: str


def compile_plan(args: argparse.Namespace):
    """The plan of `args` (as the CLI compiles one), its draft wrapped in a FaultyDraft.
    Unless `--keep-batch-policy`, every batch size runs the plan's mode (a per-batch policy may
    switch a batch to autoregressive, where a draft fault has nothing to hit)."""
    plan = api.compile(args.target, args.draft, args.device_map, cache=args.cache,
                       progress=not args.quiet, draft_timeout_s=args.draft_timeout,
                       **cli._spec_overrides(args))  # fmt: skip
    if not args.keep_batch_policy:
        plan.batch_policy = ()
    return plan, install(plan, args.draft_timeout)


def load_prompts(args: argparse.Namespace) -> list[str]:
    return [q.text for q in load_questions(args.questions, per_category=args.per_category)]


def as_prompt(endpoint: str, text: str):
    """What the endpoint hands the plan: chat messages, or the raw text (no chat template)."""
    return [{"role": "user", "content": text}] if endpoint == "chat" else text


def references(plan, prompts: list[str], lengths: list[int],
               endpoints: tuple[str, ...]) -> dict[tuple[str, int, int], Reference]:  # fmt: skip
    """The target-only greedy output for each (endpoint, prompt index, length): what every
    answer must equal."""
    out = {}
    for endpoint, (p, text), n in itertools.product(endpoints, enumerate(prompts), lengths):
        prompt, chat = as_prompt(endpoint, text), endpoint == "chat"
        res = plan.generate(prompt, n, mode="autoregressive", chat=chat)
        ids = encode_prompt(plan.tokenizer, prompt, chat=chat)
        out[(endpoint, p, n)] = Reference(ids, list(res.tokens), res.text)
    return out


def explain(plan, mismatches: list[dict], refs: dict) -> None:
    """Add to each changed output (the first MAX_EXPLAINED) the reference token where it parts
    from the reference and the target's top-2 logit margin there (a small margin: rounding
    flipped a near-tie; a large one: a bug). Runs the plan's target: call it only when nothing
    else runs on the plan."""
    for m in mismatches[:MAX_EXPLAINED]:
        ref = refs[(m.get("kind", "chat"), m["prompt"], m["length"])]
        if "first_difference" not in m:  # a server answer is text: the tokens it starts with
            m["first_difference"] = token_prefix(plan.tokenizer, ref.tokens, m["got"])
        if m["first_difference"] < len(ref.tokens):
            m.update(target_margin(plan, ref.prompt, ref.tokens[: m["first_difference"]]))


def token_prefix(tokenizer, tokens: list[int], text: str) -> int:
    """How many of `tokens` decode to a prefix of `text`."""
    k = 0
    while k < len(tokens) and text.startswith(
        tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)
    ):
        k += 1
    return k


# --- samples and flatness -----------------------------------------------------------------------
def sample(**where) -> dict:
    """RSS (MiB), Python threads and OS threads of this process now, with `where`."""
    try:
        import psutil

        proc = psutil.Process()
        rss, os_threads = proc.memory_info().rss / 2**20, proc.num_threads()
    except ImportError:
        status = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        rss, os_threads = int(status["VmRSS"].split()[0]) / 1024, int(status["Threads"])
    return {**where, "rss_mib": round(rss, 1), "threads": threading.active_count(),
            "os_threads": os_threads}  # fmt: skip


def flatness(samples: list[dict], x: str, per: float, unit: str) -> dict:
    """The RSS slope over the second half of the run (least squares, MiB per `per` of `x`) and
    the spread (max - min) of thread counts after warm-up (the first WARMUP_SHARE of samples)."""
    if not samples:
        return {}
    half = samples[len(samples) // 2 :]
    xs, ys = [s[x] for s in half], [s["rss_mib"] for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((v - mx) ** 2 for v in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / var if var else 0.0
    warm = samples[int(len(samples) * WARMUP_SHARE) :] or samples
    rss = [s["rss_mib"] for s in samples]
    return {
        "rss_slope_second_half": round(slope * per, 2), "rss_slope_unit": unit,
        "rss_first_mib": rss[0], "rss_last_mib": rss[-1], "rss_max_mib": max(rss),
        "threads_spread_after_warmup": max(s["threads"] for s in warm)
        - min(s["threads"] for s in warm),
        "os_threads_spread_after_warmup": max(s["os_threads"] for s in warm)
        - min(s["os_threads"] for s in warm),
        "warmup_samples": len(samples) - len(warm),
    }  # fmt: skip


# --- sequential ---------------------------------------------------------------------------------
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


# --- server: clients ----------------------------------------------------------------------------
class Traffic:
    """What the clients and the fault thread share: a pause (clients start no request while
    paused; `pause()` returns once none is in flight), the deadline and the records."""

    def __init__(self, deadline: float):
        self.deadline, self.records = deadline, []
        self._cond = threading.Condition()
        self._paused, self._in_flight = False, 0

    def enter(self) -> bool:
        """Wait until not paused; False once the deadline passed (the client stops)."""
        with self._cond:
            while self._paused and time.monotonic() < self.deadline:
                self._cond.wait(0.5)
            if time.monotonic() >= self.deadline:
                return False
            self._in_flight += 1
            return True

    def leave(self, record: dict) -> None:
        with self._cond:
            self.records.append(record)
            self._in_flight -= 1
            self._cond.notify_all()

    def pause(self, timeout: float) -> bool:
        """Stop new requests and wait for those in flight; False after `timeout`."""
        with self._cond:
            self._paused = True
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()


def malformed_requests(model: str, max_len: int) -> dict[str, tuple[str, str, dict]]:
    """Name -> (method, path, httpx arguments) of requests that must get a 4xx JSON error."""
    ok = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    chat, completion = ENDPOINTS["chat"], ENDPOINTS["completion"]
    return {
        "bad_json": ("POST", chat, {"content": b"{not json",
                                     "headers": {"content-type": "application/json"}}),
        "not_an_object": ("POST", completion, {"json": [1, 2]}),
        "messages_not_a_list": ("POST", chat, {"json": {**ok, "messages": "hi"}}),
        "max_tokens_a_string": ("POST", chat, {"json": {**ok, "max_tokens": "12"}}),
        "negative_max_tokens": ("POST", chat, {"json": {**ok, "max_tokens": -1}}),
        "temperature_out_of_range": ("POST", chat, {"json": {**ok, "temperature": 3}}),
        "unknown_model": ("POST", chat, {"json": {**ok, "model": "no-such-model"}}),
        "prompt_too_long": ("POST", completion, {"json": {
            "model": model, "prompt": "hello " * (max_len + 8), "max_tokens": 4}}),
        "wrong_method": ("GET", chat, {}),
    }  # fmt: skip


def send_malformed(http: httpx.Client, url: str, name: str, request: tuple) -> dict:
    method, path, kwargs = request
    r = http.request(method, url + path, **kwargs)
    try:
        error_body = isinstance(r.json().get("error"), dict)
    except ValueError:
        error_body = False
    outcome = "rejected" if 400 <= r.status_code < 500 and error_body else "unexpected"
    return {"kind": f"malformed:{name}", "status": r.status_code, "outcome": outcome}


def send_valid(http: httpx.Client, url: str, model: str, job: dict, ref: Reference) -> dict:
    """One greedy request; its outcome: ok (equal to the reference), changed, cancelled (the
    client closed a stream part way; what came must be a prefix of the reference), unexpected
    (a valid request got a 4xx) or lost (a 5xx, an error event, no answer)."""
    body = {"model": model, "max_tokens": job["length"], "temperature": 0}
    text = job["text"]
    chat = job["kind"] == "chat"
    body.update({"messages": as_prompt("chat", text)} if chat else {"prompt": text})
    path = ENDPOINTS[job["kind"]]
    if not job["stream"]:
        r = http.post(url + path, json=body)
        if r.status_code != 200:
            return {"status": r.status_code, "outcome": status_outcome(r.status_code)}
        choice = r.json()["choices"][0]
        got = choice["message"]["content"] if chat else choice["text"]
        return {"status": 200, "outcome": "ok" if got == ref.text else "changed", "got": got}
    parts, end, pieces = [], None, 0
    with http.stream("POST", url + path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "outcome": status_outcome(r.status_code)}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                end = "done"
                break
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                end = f"error event: {event['error'].get('message')}"
                break
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") or choice.get("text") or ""
                parts.append(piece)
                pieces += bool(piece)
            if job["cancel_after"] and pieces >= job["cancel_after"]:
                end = "cancelled"
                break  # leaving the block closes the connection mid-stream
    got = "".join(parts)
    if end == "cancelled":
        return {"status": 200, "outcome": "cancelled" if ref.text.startswith(got) else "changed",
                "got": got}  # fmt: skip
    if end != "done":
        return {"status": 200, "outcome": "lost", "error": end or "stream ended without [DONE]"}
    return {"status": 200, "outcome": "ok" if got == ref.text else "changed", "got": got}


def status_outcome(status: int) -> str:
    return "lost" if status >= 500 else "unexpected"


def client_loop(c: int, url: str, model: str, prompts: list[str], refs: dict,
                traffic: Traffic, args: argparse.Namespace, start: float) -> None:  # fmt: skip
    rng = random.Random(args.seed * 1000 + c)
    bad = malformed_requests(model, args.plan_max_len)
    lengths, endpoints = parse_list(args.lengths, int), parse_list(args.endpoints, str)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
        while traffic.enter():
            t0, job, ref = time.monotonic(), {}, None
            try:
                if rng.random() < args.malformed_rate:
                    name = rng.choice(sorted(bad))
                    rec = send_malformed(http, url, name, bad[name])
                else:
                    stream = rng.random() < args.stream_rate
                    job = {"kind": rng.choice(endpoints), "prompt": rng.randrange(len(prompts)),
                           "length": rng.choice(lengths), "stream": stream,
                           "cancel_after": rng.randint(1, 3)
                           if stream and rng.random() < args.cancel_rate else 0}  # fmt: skip
                    ref = refs[(job["kind"], job["prompt"], job["length"])]
                    rec = send_valid(http, url, model, {**job, "text": prompts[job["prompt"]]}, ref)
            except (httpx.HTTPError, ValueError, KeyError) as exc:  # no (usable) answer
                rec = {"outcome": "lost", "error": f"{type(exc).__name__}: {exc}"}
            rec = {"client": c, "t": round(t0 - start, 2),
                   "wall_s": round(time.monotonic() - t0, 3), **job, **rec}  # fmt: skip
            if rec["outcome"] == "ok":
                rec.pop("got", None)  # keep the records small: only what differs is kept
            elif rec["outcome"] == "changed":
                rec["expected"] = ref.text
            traffic.leave(rec)


# --- server: faults and metrics -----------------------------------------------------------------
def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed: (sample name, sorted labels) -> value."""
    text = httpx.get(base + "/metrics", timeout=60).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def metric(m: dict, name: str, **labels) -> float:
    return m.get((f"mirror_sd_{name}", tuple(sorted(labels.items()))), 0.0)


def wait_idle(plan, timeout: float) -> bool:
    """Wait until no batch session (or serial generation) holds the plan; call it only while no
    request is in flight or queued (claiming the plan then cannot refuse one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            plan.claim()
        except PlanBusyError:
            time.sleep(0.05)
            continue
        plan.release()
        return True
    return False


class FaultInjector:
    """Every `every` seconds: pause the clients until the batch drained, judge the last fault
    by /metrics, re-arm the draft, arm the next fault (raise and hang in turn), resume."""

    def __init__(self, plan, draft: FaultyDraft, base: str, traffic: Traffic, every: float,
                 start: float, seed: int):  # fmt: skip
        self.plan, self.draft, self.base, self.traffic = plan, draft, base, traffic
        self.every, self.start, self.rng = every, start, random.Random(seed + 7)
        self.faults: list[dict] = []
        self.errors: list[str] = []
        self._kinds = itertools.cycle(FAULTS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-faults", daemon=True)

    def __enter__(self) -> FaultInjector:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        at = self.start + self.every
        while not self._stop.wait(max(0.0, at - time.monotonic())):
            if self.traffic.deadline - time.monotonic() < self.every / 2:
                return  # too late for the next fault to fire: finish() judges the last one
            try:
                if self.drain():
                    self.judge()
                    rearm(self.plan, self.draft)
                    self.arm()
            except Exception as exc:  # a broken /metrics or draft: recorded, traffic goes on
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self.traffic.resume()
            at += self.every

    def drain(self) -> bool:
        """Pause the clients; True once no request is in flight and no session holds the plan."""
        if self.traffic.pause(DRAIN_TIMEOUT_S) and wait_idle(self.plan, DRAIN_TIMEOUT_S):
            return True
        self.errors.append(f"t={time.monotonic() - self.start:.0f} s: the batch did not drain "
                           f"within {DRAIN_TIMEOUT_S:.0f} s")  # fmt: skip
        return False

    def arm(self) -> None:
        kind, after = next(self._kinds), self.rng.randint(1, 3)
        m = scrape(self.base)
        self.faults.append({"kind": kind, "after": after,
                            "armed_t": round(time.monotonic() - self.start, 2),
                            "fallbacks_before": metric(m, "draft_fallbacks_total")})  # fmt: skip
        self.draft.arm(kind, after)

    def judge(self) -> None:
        """The last fault, once its session ended: did it fire, and does /metrics show it?"""
        if not self.faults or "fired" in self.faults[-1]:
            return
        f, m = self.faults[-1], scrape(self.base)
        self.draft.disarm()
        fired_at = self.draft.fired_at
        fallbacks = metric(m, "draft_fallbacks_total")
        f.update(fired=fired_at is not None, fallbacks_after=fallbacks,
                 draft_disabled=metric(m, "draft_disabled") == 1.0)  # fmt: skip
        if fired_at is not None:
            f["t"] = round(fired_at - self.start, 2)
            f["seen"] = fallbacks > f["fallbacks_before"] and (
                f["kind"] != "hang" or f["draft_disabled"]
            )

    def finish(self) -> None:
        """After the clients stopped: judge the last fault and re-arm the draft."""
        if wait_idle(self.plan, DRAIN_TIMEOUT_S):
            self.judge()
            rearm(self.plan, self.draft)
        else:
            self.errors.append("the plan was still busy after the clients stopped")


def run_server(args: argparse.Namespace) -> dict:
    plan, draft = compile_plan(args)
    args.plan_max_len = int(plan.spec.max_len)
    model = Path(args.target).name
    try:
        prompts, lengths = load_prompts(args), parse_list(args.lengths, int)
        refs = references(plan, prompts, lengths, tuple(parse_list(args.endpoints, str)))
        config = ServeConfig(model, port=0, engine=args.engine, prefix_cache=args.prefix_cache)
        with ServerThread(plan, config) as server:
            base = server.url.removesuffix("/v1")
            start = time.monotonic()
            traffic = Traffic(start + args.duration)
            samples, stop = [sample(t=0.0, requests=0)], threading.Event()

            def sampler() -> None:
                while not stop.wait(args.sample_every):
                    samples.append(sample(t=round(time.monotonic() - start, 2),
                                          requests=len(traffic.records)))  # fmt: skip
                    progress(args, time.monotonic() - start, args.duration, *bad(traffic))

            clients = [threading.Thread(target=client_loop, name=f"soak-client-{c}",
                                        args=(c, server.url, model, prompts, refs, traffic, args,
                                              start), daemon=True) for c in range(args.clients)]  # fmt: skip
            watcher = threading.Thread(target=sampler, name="soak-sampler", daemon=True)
            watcher.start()
            with FaultInjector(plan, draft, base, traffic, args.fault_every, start,
                               args.seed) as injector:  # fmt: skip
                for c in clients:
                    c.start()
                for c in clients:
                    c.join()
            injector.finish()
            stop.set()
            watcher.join()
            samples.append(sample(t=round(time.monotonic() - start, 2),
                                  requests=len(traffic.records)))  # fmt: skip
            final = scrape(base)
        explain(plan, [r for r in traffic.records if r["outcome"] == "changed"], refs)
        return server_result(plan, traffic.records, injector, samples, final, args.duration)
    finally:
        plan.close()


def bad(traffic: Traffic) -> tuple[int, int]:
    """(changed, lost) so far."""
    outcomes = Counter(r["outcome"] for r in list(traffic.records))
    return outcomes["changed"], outcomes["lost"] + outcomes["unexpected"]


def server_result(plan, records: list[dict], injector: FaultInjector, samples: list[dict],
                  m: dict, duration: float) -> dict:  # fmt: skip
    outcomes = Counter(r["outcome"] for r in records)
    faults = injector.faults
    fired = [f for f in faults if f.get("fired")]
    http_200 = sum(metric(m, "requests_total", endpoint=f"/v1{p}", status="200")
                   for p in ENDPOINTS.values())  # fmt: skip
    counts = {
        "sent": len(records), "answered": outcomes["ok"], "changed": outcomes["changed"],
        "cancelled_by_client": outcomes["cancelled"], "rejected_4xx": outcomes["rejected"],
        "unexpected_status": outcomes["unexpected"], "lost": outcomes["lost"],
        "streamed": sum(bool(r.get("stream")) for r in records),
        "by_kind": dict(Counter(r["kind"].split(":")[0] for r in records if "kind" in r)),
        "faults_armed": len(faults), "faults_fired": dict(Counter(f["kind"] for f in fired)),
        "faults_unseen": sum(not f["seen"] for f in fired),
        "metrics": {
            "draft_fallbacks_total": metric(m, "draft_fallbacks_total"),
            "client_disconnects_total": metric(m, "client_disconnects_total"),
            "generations_completed": metric(m, "generations_total", outcome="completed"),
            "generations_cancelled": metric(m, "generations_total", outcome="cancelled"),
            "http_200_generation_endpoints": http_200,
            "expected_200": sum(r.get("status") == 200 for r in records),
        },
    }  # fmt: skip
    ok = not (outcomes["changed"] or outcomes["lost"] or outcomes["unexpected"]
              or counts["faults_unseen"] or injector.errors or (faults and not fired))  # fmt: skip
    return {"kind": "server", "plan": plan_info(plan), "counts": counts, "ok": ok,
            "mismatches": [r for r in records if r["outcome"] == "changed"],
            "lost": [r for r in records if r["outcome"] in ("lost", "unexpected")],
            "faults": faults, "errors": injector.errors, "samples": samples,
            "flatness": flatness([s for s in samples if 0 < s["t"] < duration], "t", 3600,
                                 "MiB per hour"),  # while the clients run
            "requests": records, "x": "t"}  # fmt: skip


# --- report -------------------------------------------------------------------------------------
def plan_info(plan) -> dict:
    return {"spec": asdict(plan.spec), "target": plan.target_device.label,
            "draft": plan.draft_device.label if plan.draft_device else None,
            "batch_policy": [s.describe() for s in plan.batch_policy]}  # fmt: skip


def write_report(out: Path, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "soak.md").write_text(markdown(doc))
    plot(doc, out / "rss_threads.png")


def markdown(doc: dict) -> str:
    c, f, kind = doc["counts"], doc["flatness"], doc["kind"]
    fired = ", ".join(f"{k} {v}" for k, v in c["faults_fired"].items()) or "none"
    rows = [("verdict", "PASS" if doc["ok"] else "FAIL")]
    if kind == "sequential":
        rows += [("generations", c["generations"]),
                 ("identical to target-only greedy", c["identical"]),
                 ("changed", c["changed"]), ("lost (raised)", c["lost"]),
                 ("by mode", ", ".join(f"{k} {v}" for k, v in c["by_mode"].items())),
                 ("draft faults fired (unseen)", f"{fired} ({c['faults_unseen']})"),
                 ("fallbacks (spontaneous)", f"{c['fallbacks']} ({c['spontaneous_fallbacks']})")]  # fmt: skip
    else:
        mx = c["metrics"]
        rows += [("requests sent", c["sent"]), ("answered, identical", c["answered"]),
                 ("changed", c["changed"]), ("cancelled by the client", c["cancelled_by_client"]),
                 ("malformed, 4xx", c["rejected_4xx"]),
                 ("unexpected status", c["unexpected_status"]), ("lost", c["lost"]),
                 ("draft faults armed / fired (unseen)",
                  f"{c['faults_armed']} / {fired} ({c['faults_unseen']})"),
                 ("/metrics draft_fallbacks_total", mx["draft_fallbacks_total"]),
                 ("/metrics 200s (expected)",
                  f"{mx['http_200_generation_endpoints']:.0f} ({mx['expected_200']})")]  # fmt: skip
    margins = sorted(m["margin"] for m in doc["mismatches"] if "margin" in m)
    if margins:
        rows.append(("target's top-2 logit margin where changed outputs part",
                     ", ".join(f"{x:.3g}" for x in margins[:10])))  # fmt: skip
    if f:
        rows += [("RSS first / last / max (MiB)",
                  f"{f['rss_first_mib']} / {f['rss_last_mib']} / {f['rss_max_mib']}"),
                 ("RSS slope, second half", f"{f['rss_slope_second_half']} {f['rss_slope_unit']}"),
                 ("threads max - min after warm-up (Python / OS)",
                  f"{f['threads_spread_after_warmup']} / {f['os_threads_spread_after_warmup']}")]  # fmt: skip
    m = doc["machine"]
    head = (f"# Soak: {kind}\n\n{doc['date']}, {m['cpu']} ({m['cores']} cores, {m['memory_gib']} "
            f"GiB), load average {m['load_average_at_start']} -> {m['load_average_at_end']}, "
            f"{doc['wall_s']:.0f} s\n\n`{doc['command']}`\n\n| | |\n| --- | --- |\n")  # fmt: skip
    return head + "".join(f"| {k} | {v} |\n" for k, v in rows) + "\n![](rss_threads.png)\n"


def plot(doc: dict, path: Path) -> None:
    """RSS and thread counts over the run, the faults that fired marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    x, samples = doc["x"], doc["samples"]
    xs = [s[x] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    top.plot(xs, [s["rss_mib"] for s in samples], color="tab:blue")
    top.set_ylabel("RSS (MiB)")
    bottom.plot(xs, [s["threads"] for s in samples], label="Python threads")
    bottom.plot(xs, [s["os_threads"] for s in samples], label="OS threads")
    bottom.set_ylabel("threads")
    for f in doc["faults"]:
        if f.get(x) is not None:
            for ax in (top, bottom):
                ax.axvline(f[x], color=COLORS[f["kind"]], ls=":", lw=0.9)
    marks = [Line2D([], [], color=c, ls=":", label=f"draft fault: {k}") for k, c in COLORS.items()]
    if doc["kind"] == "server":  # after this the clients finish what they sent, then leave
        for ax in (top, bottom):
            ax.axvline(doc["settings"]["duration"], color="gray", ls="--", lw=0.9)
        marks.append(Line2D([], [], color="gray", ls="--", label="clients stop"))
    bottom.legend(handles=bottom.get_legend_handles_labels()[0] + marks, fontsize=8)
    bottom.set_xlabel("generation" if x == "i" else "seconds")
    top.set_title(f"soak ({doc['kind']}): RSS and threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line -------------------------------------------------------------------------------
def parse_list(text: str, kind):
    return [kind(v) for v in text.split(",") if v.strip()]


def progress(args: argparse.Namespace, done: float, total: float, changed: int, lost: int) -> None:
    """A line on stderr at most every PROGRESS_S seconds (and at the end)."""
    now = time.monotonic()
    if not args.quiet and (done >= total or now - getattr(args, "_shown", 0.0) >= PROGRESS_S):
        args._shown = now
        print(f"[soak {args.command}: {done:.0f}/{total:.0f}, changed {changed}, lost {lost}]",
              file=sys.stderr, flush=True)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/soak.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    seq = sub.add_parser("sequential", help="N generations in a row, draft faults injected")
    srv = sub.add_parser("server", help="a bounded server run: clients, cancels, bad requests")
    for p in (seq, srv):
        p.add_argument("--target", default=DEFAULT_MODEL, help="known model name or HF folder")
        cli._add_plan_args(p, "")
        p.set_defaults(draft=DEFAULT_MODEL, mode="mirror")
        p.add_argument("--out", required=True, type=Path, help="folder for soak.json / .md / .png")
        p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: "
                       "$MIRROR_SD_SPEC_BENCH, else ../shared/data/spec_bench)")  # fmt: skip
        p.add_argument("--per-category", type=int, default=2, help="prompts per Spec-Bench task")
        p.add_argument("--lengths", default="16,32,64,128", help="max_new_tokens to mix")
        p.add_argument("--draft-timeout", type=float,
                       help="the plan's draft_timeout_s: a hung draft step is given up after it "
                       "(sequential: 5 s; server: 30 s, SpecConfig's, as a served plan has it)")  # fmt: skip
        p.add_argument(
            "--keep-batch-policy",
            action="store_true",
            help="keep the plan's per-batch-size modes (default: its mode at every size)",
        )
        p.add_argument("--seed", type=int, default=0)
    seq.set_defaults(draft_timeout=5.0)
    srv.set_defaults(draft_timeout=30.0)
    seq.add_argument("--generations", type=int, default=1000)
    seq.add_argument("--modes", default=",".join(MODES), help="generation modes to mix")
    seq.add_argument(
        "--fault-rate",
        type=float,
        default=0.1,
        help="share of the drafting generations given a draft fault",
    )
    srv.add_argument("--duration", type=float, default=1800.0, help="seconds of traffic")
    srv.add_argument("--clients", type=int, default=8)
    srv.add_argument("--fault-every", type=float, default=150.0, help="seconds between faults")
    srv.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    srv.add_argument("--engine", default="batch", choices=("batch", "serial"))
    srv.add_argument("--endpoints", default="chat,completion")
    srv.add_argument("--prefix-cache", action="store_true",
                     help="serve with the prefix cache, as `mirror-sd serve` does (its reuse may "
                     "part from the reference at a near-tie: docs/runtime.md, Prefix caching)")  # fmt: skip
    srv.add_argument("--stream-rate", type=float, default=0.5, help="share of streamed requests")
    srv.add_argument(
        "--cancel-rate", type=float, default=0.2, help="share of streams the client closes part way"
    )
    srv.add_argument("--malformed-rate", type=float, default=0.1, help="share of bad requests")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="draft device failed")  # counted, not printed
    machine, t0 = machine_info(), time.monotonic()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = (run_sequential if args.command == "sequential" else run_server)(args)
    machine["load_average_at_end"] = load_average()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {"schema": SCHEMA, "date": date, "wall_s": round(time.monotonic() - t0, 1),
           "command": shlex.join(["python", "scripts/soak.py", *(sys.argv[1:] if argv is None
                                                                  else argv)]),
           "settings": settings, "machine": machine, "versions": versions(), **result}  # fmt: skip
    write_report(args.out, doc)
    c = doc["counts"]
    print(f"soak {args.command}: {'PASS' if doc['ok'] else 'FAIL'}; {json.dumps(c)}; "
          f"{args.out / 'soak.md'}", file=sys.stderr)  # fmt: skip
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
