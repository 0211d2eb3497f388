"""The server run's clients: `Traffic` (the pause, deadline and records the clients share with
the fault thread), the malformed requests that must get a 4xx, and `client_loop`, one
client sending greedy chat and completion requests, whole and streamed, closing some streams
part way, each answer judged against its reference."""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

import httpx

from mirror_sd.soak.plans import Reference, as_prompt, parse_list

ENDPOINTS = {"chat": "/chat/completions", "completion": "/completions"}
REQUEST_TIMEOUT_S = 900.0  # a request not answered within this counts as lost


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
