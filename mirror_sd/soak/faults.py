"""Draft faults on purpose, and how they are seen: `FaultyDraft` wraps the plan's draft runner
and makes a chosen forward raise (a lost device) or hang; `rearm` restores the draft after a
fault, as an operator restarting the draft device would; `FaultInjector` is the server run's
fault thread, judging each fault by the server's /metrics (`scrape`, `metric`)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mirror_sd.devices.base import RunnerWrapper
from mirror_sd.runtime.busy import PlanBusyError

FAULTS = ("raise", "hang")
DRAIN_TIMEOUT_S = 900.0  # the clients' pause before a fault waits at most this long


class Pausable(Protocol):
    """What the injector needs of the clients (`traffic.Traffic`): their deadline, and a pause
    that returns once no request is in flight."""

    deadline: float

    def pause(self, timeout: float) -> bool: ...

    def resume(self) -> None: ...


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
    """After a fault: release a hung forward (the device recovers) and wait until the draft
    pipeline has run everything queued on it; the plan takes a hung draft back once its call
    returns (`Plan.retire`), and `draft_disabled` is cleared here in any case. Returns whether
    the plan had left the draft off (it hung)."""
    disabled = plan.draft_disabled is not None
    draft.release()
    if not draft.idle.wait(draft.hang_s):
        raise RuntimeError("the released draft forward did not return")
    plan.draft_pipe.pool.submit(lambda: None).result(timeout=draft.hang_s)
    plan.draft_disabled = None
    return disabled


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

    def __init__(self, plan, draft: FaultyDraft, base: str, traffic: Pausable, every: float,
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
