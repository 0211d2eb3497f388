"""Read, check and summarize the Chrome traces that `Tracer` writes.

    trace = load_trace("trace.json")        # validated; TraceError names what is malformed
    print(summarize(trace).table())         # busy %, overlap, exposed draft time, hits, ...

The summary follows the latency model of docs/algorithm.md: a device is busy while one of its
"X" slices runs; overlap is the time both devices are busy over the time any is busy;
exposed draft time is all `draft.chain` time (chain drafting always stalls the target)
plus, per mirror round, how long `draft.rollout` ran past the end of that round's
`target.suffix`. Timestamps in the JSON are microseconds; everything here is seconds.
`parse_timeline` is the parsed view that `trace_plot.plot_timeline` draws.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Graph nodes the scheduler names its slices after (see runtime/scheduler.py).
PREFILL = "target.prefill"
PREFIX = "target.prefix+exit_head"
SUFFIX = "target.suffix"
VERIFY = "target.verify"
CHAIN = "draft.chain"
ROLLOUT = "draft.rollout"
TOKEN_CHANNEL = "token channel"
RENDEZVOUS = "rendezvous"

_PHASES = {"X", "s", "f", "t", "C", "i", "I", "M"}
_US = 1e-6  # trace microseconds -> seconds


class TraceError(ValueError):
    """The trace file is missing, is not JSON, or does not have the Chrome trace shape."""


# --- loading and validation --------------------------------------------------------------
def load_trace(path: str | Path) -> dict:
    """Read a Chrome trace JSON file and validate it.

    Returns `{"traceEvents": [...], ...}` (the JSON Array Format is wrapped into that).
    Raises TraceError naming the file, the event index and the offending field.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read trace file ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    if isinstance(data, list):
        data = {"traceEvents": data}
    return validate_trace(data, source=str(path))


def validate_trace(trace: object, source: str = "trace") -> dict:
    """Check the shape of every event that the summary and the plot rely on; return `trace`."""
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise TraceError(
            f"{source}: expected an object with a 'traceEvents' list (Chrome trace event "
            f"format), got {type(trace).__name__}"
            + (f" with keys {sorted(trace)}" if isinstance(trace, dict) else "")
        )
    for i, ev in enumerate(trace["traceEvents"]):
        problem = _event_problem(ev)
        if problem:
            where = f"traceEvents[{i}]"
            if isinstance(ev, dict):
                where += f" (ph {ev.get('ph')!r}, name {ev.get('name')!r})"
            raise TraceError(f"{source}: {where}: {problem}")
    return trace


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _event_problem(ev: object) -> str | None:
    """What is wrong with one event, or None."""
    if not isinstance(ev, dict):
        return f"an event must be an object, got {type(ev).__name__}"
    ph = ev.get("ph")
    if ph not in _PHASES:
        return f"phase {ph!r} is not supported; expected one of {sorted(_PHASES)}"
    if not isinstance(ev.get("name"), str) or not ev["name"]:
        return "'name' must be a non-empty string"
    if "pid" not in ev:
        return "'pid' is missing"
    if ph == "M":
        args = ev.get("args")
        if ev["name"] in ("process_name", "thread_name") and not (
            isinstance(args, dict) and isinstance(args.get("name"), str)
        ):
            return "metadata needs args.name (a string)"
        return None
    if not _is_num(ev.get("ts")):
        return f"'ts' must be a finite number (microseconds), got {ev.get('ts')!r}"
    if ph != "C" and "tid" not in ev:
        return "'tid' is missing"
    if ph == "X" and not (_is_num(ev.get("dur")) and ev["dur"] >= 0):
        return f"'dur' must be a number >= 0, got {ev.get('dur')!r}"
    if ph in ("s", "f", "t") and "id" not in ev:
        return "flow events need an 'id' shared by their 's' and 'f' ends"
    if ph == "C":
        args = ev.get("args")
        if not isinstance(args, dict) or not all(_is_num(v) for v in args.values()):
            return f"counter 'args' must map series names to numbers, got {args!r}"
    return None


# --- parsed view ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Slice:
    """One "X" event: a graph node running on one lane (a device pipeline), in seconds."""

    name: str
    lane: tuple  # (pid, tid)
    start: float  # seconds
    end: float

    @property
    def dur(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Timeline:
    """A validated trace sorted for reading (`parse_timeline`): times in seconds."""

    processes: dict  # pid -> name
    threads: dict  # (pid, tid) -> name
    slices: list[Slice]  # sorted by start
    flows: list[tuple[str, tuple, float, tuple, float]]  # name, src lane, t, dst lane, t
    counters: list[tuple[str, float, dict]]  # name, t, values (sorted by t)
    instants: list[tuple[str, tuple, float, dict]]  # name, lane, t, args

    def named(self, name: str) -> list[Slice]:
        return [s for s in self.slices if s.name == name]

    def lane_label(self, lane: tuple) -> str:
        return f"{self.process(lane[0])}\n{self.threads.get(lane, f'tid {lane[1]}')}"

    def process(self, pid: object) -> str:
        return self.processes.get(pid, f"pid {pid}")


def parse_timeline(trace: dict) -> Timeline:
    """The trace's events sorted into processes, lanes, slices, flows, counters and instants.

    Raises TraceError if `trace` does not have the Chrome trace shape.
    """
    events = validate_trace(trace)["traceEvents"]
    processes, threads, slices, counters, instants = {}, {}, [], [], []
    flow_ends: dict[tuple, dict[str, tuple]] = {}
    for ev in events:
        ph, lane = ev["ph"], (ev["pid"], ev.get("tid"))
        if ph == "M" and ev["name"] == "process_name":
            processes[ev["pid"]] = ev["args"]["name"]
        elif ph == "M" and ev["name"] == "thread_name":
            threads[lane] = ev["args"]["name"]
        elif ph == "X":
            t = ev["ts"] * _US
            slices.append(Slice(ev["name"], lane, t, t + ev["dur"] * _US))
        elif ph in ("s", "f"):
            key = (ev.get("cat"), ev["id"])
            flow_ends.setdefault(key, {})[ph] = (ev["name"], lane, ev["ts"] * _US)
        elif ph == "C":
            counters.append((ev["name"], ev["ts"] * _US, ev.get("args", {})))
        elif ph in ("i", "I"):
            instants.append((ev["name"], lane, ev["ts"] * _US, ev.get("args") or {}))
    flows = [
        (e["s"][0], e["s"][1], e["s"][2], e["f"][1], e["f"][2])
        for e in flow_ends.values()
        if "s" in e and "f" in e
    ]
    slices.sort(key=lambda s: s.start)
    counters.sort(key=lambda c: c[1])
    return Timeline(
        processes, threads, slices, sorted(flows, key=lambda f: f[2]), counters, instants
    )


# --- interval arithmetic -------------------------------------------------------------------
def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping [start, end) intervals."""
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals: Iterable[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _covered_by_at_least(k: int, unions: list[list[tuple[float, float]]]) -> float:
    """Total time during which at least k of the interval sets are active (sweep line)."""
    points = sorted(
        [(a, 1) for u in unions for a, _ in u] + [(b, -1) for u in unions for _, b in u]
    )
    total, active, last = 0.0, 0, 0.0
    for t, step in points:
        if active >= k:
            total += t - last
        active, last = active + step, t
    return total


# --- rounds --------------------------------------------------------------------------------
def _round_pairs(tl: Timeline) -> list[tuple[Slice, Slice | None]]:
    """(target.suffix, its concurrent draft.rollout or None) per mirror round.

    A mirror round's suffix and rollout are both submitted after its prefix ends and both
    finish before the next prefix starts, so they pair up between consecutive prefixes.
    """
    prefix_starts = [s.start for s in tl.named(PREFIX)]
    by_round: dict[int, Slice] = {}
    for r in tl.named(ROLLOUT):
        by_round.setdefault(bisect_right(prefix_starts, r.start), r)
    return [(s, by_round.get(bisect_right(prefix_starts, s.start))) for s in tl.named(SUFFIX)]


def verification_rounds(tl: Timeline) -> list[tuple[Slice, float]]:
    """(verification slice, round end) per round in order: suffix or verify, and the rollout."""
    ends = {s: max(s.end, r.end if r else s.end) for s, r in _round_pairs(tl)}
    verif = sorted(tl.named(SUFFIX) + tl.named(VERIFY), key=lambda s: s.start)
    return [(s, ends.get(s, s.end)) for s in verif]


# --- summary -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceBusy:
    name: str  # the device process, e.g. "gpu (torch cuda:0)"
    busy_s: float  # union of its slices
    busy_frac: float  # busy_s / the trace's wall span


@dataclass(frozen=True)
class Fallback:
    t_s: float  # trace time of the marker
    why: str


@dataclass(frozen=True)
class TraceSummary:
    span_s: float  # first to last timed event
    devices: tuple[DeviceBusy, ...]  # every process that has slices, in trace order
    overlap_frac: float  # time >= 2 devices busy / time any device busy, in [0, 1]
    exposed_draft_s: float  # chain_s + rollout_overrun_s
    chain_s: float  # all draft.chain time (always on the critical path)
    rollout_overrun_s: float  # sum over rounds of max(0, rollout end - suffix end)
    rounds: int  # target.suffix + target.verify slices
    mirror_rounds: int  # target.suffix slices
    tokens: int | None  # last value of the "tokens" counter
    accepted: int | None  # sum of the "accepted" counter: draft tokens the target kept
    hits: int | None  # sum of the per-round "hits" counter; None when the trace has none
    verdicts: int | None  # rounds that reported a hit or a miss
    fallbacks: tuple[Fallback, ...]

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.verdicts if self.hits is not None and self.verdicts else None

    def device(self, alias: str) -> DeviceBusy:
        """The device whose process is `alias` or is named "alias (backend ...)"."""
        for d in self.devices:
            if d.name == alias or d.name.startswith(f"{alias} ("):
                return d
        raise KeyError(f"no device {alias!r} in the trace; have {[d.name for d in self.devices]}")

    def table(self) -> str:
        """The summary as aligned text lines for a terminal."""
        ms = 1e3
        rows = [("wall span", f"{self.span_s * ms:.1f} ms")]
        rows.append(("rounds", f"{self.rounds} ({self.mirror_rounds} mirror, "
                               f"{self.rounds - self.mirror_rounds} plain verify)"))  # fmt: skip
        if self.tokens is not None:
            per = f", {self.tokens / self.rounds:.2f} per round" if self.rounds else ""
            rows.append(("tokens committed", f"{self.tokens}{per}"))
        if self.accepted is not None:
            rows.append(("draft tokens accepted", str(self.accepted)))
        rows.append(("hits", _hits_text(self.hits, self.verdicts)))
        for d in self.devices:
            rows.append((f"busy: {d.name}", f"{d.busy_s * ms:.1f} ms ({d.busy_frac:.0%} of span)"))
        rows.append(("overlap", f"{self.overlap_frac:.0%} of busy time has both devices busy"))
        rows.append(("exposed draft", f"{self.exposed_draft_s * ms:.1f} ms (chain "
                     f"{self.chain_s * ms:.1f} ms + rollout past suffix "
                     f"{self.rollout_overrun_s * ms:.1f} ms)"))  # fmt: skip
        rows += [("fallback", f"at {f.t_s * ms:.1f} ms: {f.why}") for f in self.fallbacks]
        if not self.fallbacks:
            rows.append(("fallback", "none"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _hits_text(hits: int | None, verdicts: int | None) -> str:
    if hits is None:
        return "n/a (the trace has no 'hits' counter)"
    rate = f" ({hits / verdicts:.0%})" if verdicts else ""
    return f"{hits} of {verdicts} mirror rounds{rate}"


def _span(trace: dict) -> tuple[float, float]:
    times = [
        (e["ts"] * _US, (e["ts"] + e.get("dur", 0)) * _US)
        for e in trace["traceEvents"]
        if e["ph"] != "M"
    ]
    if not times:
        return 0.0, 0.0
    return min(a for a, _ in times), max(b for _, b in times)


def _counter_values(tl: Timeline, name: str, key: str) -> list[float]:
    return [v[key] for n, _, v in tl.counters if n == name and key in v]


def summarize(trace: dict) -> TraceSummary:
    """Busy time, overlap, exposed draft time, rounds, hits and fallbacks of one trace.

    Raises TraceError if `trace` does not have the Chrome trace shape.
    """
    tl = parse_timeline(trace)
    t_lo, t_hi = _span(trace)
    span = t_hi - t_lo
    pids = list(dict.fromkeys(s.lane[0] for s in tl.slices))
    unions = [_union((s.start, s.end) for s in tl.slices if s.lane[0] == p) for p in pids]
    devices = tuple(
        DeviceBusy(tl.process(p), _length(u), _length(u) / span if span else 0.0)
        for p, u in zip(pids, unions, strict=True)
    )
    any_busy = _covered_by_at_least(1, unions)
    overlap = _covered_by_at_least(2, unions) / any_busy if any_busy else 0.0
    chain = sum(s.dur for s in tl.named(CHAIN))
    overrun = sum(max(0.0, r.end - s.end) for s, r in _round_pairs(tl) if r is not None)
    tokens = _counter_values(tl, "tokens", "committed")
    accepted = _counter_values(tl, "accepted", "accepted")
    hits = _counter_values(tl, "hits", "hit")
    fallbacks = tuple(
        Fallback(t, str(args.get("why", name)))
        for name, _, t, args in tl.instants
        if "fallback" in name
    )
    return TraceSummary(
        span_s=span,
        devices=devices,
        overlap_frac=min(1.0, overlap),
        exposed_draft_s=chain + overrun,
        chain_s=chain,
        rollout_overrun_s=overrun,
        rounds=len(tl.named(SUFFIX)) + len(tl.named(VERIFY)),
        mirror_rounds=len(tl.named(SUFFIX)),
        tokens=int(tokens[-1]) if tokens else None,
        accepted=int(sum(accepted)) if accepted else None,
        hits=int(sum(hits)) if hits else None,
        verdicts=len(hits) if hits else None,
        fallbacks=fallbacks,
    )
