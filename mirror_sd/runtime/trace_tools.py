"""Read, check, summarize and draw the Chrome traces that `Tracer` writes.

    trace = load_trace("trace.json")        # validated; TraceError names what is malformed
    print(summarize(trace).table())         # busy %, overlap, exposed draft time, hits, ...
    plot_timeline(trace, "timeline.png")    # the first rounds as a PNG (needs matplotlib)

The summary follows the latency model of docs/algorithm.md: a device is busy while one of its
"X" slices runs; overlap is the time both devices are busy over the time any is busy;
exposed draft time is all `draft.chain` time (chain drafting always stalls the target)
plus, per mirror round, how long `draft.rollout` ran past the end of that round's
`target.suffix`. Timestamps in the JSON are microseconds; everything here is seconds.
"""

from __future__ import annotations

import json
import math
import sys
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
class _Slice:
    name: str
    lane: tuple  # (pid, tid)
    start: float  # seconds
    end: float

    @property
    def dur(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class _Timeline:
    processes: dict  # pid -> name
    threads: dict  # (pid, tid) -> name
    slices: list[_Slice]  # sorted by start
    flows: list[tuple[str, tuple, float, tuple, float]]  # name, src lane, t, dst lane, t
    counters: list[tuple[str, float, dict]]  # name, t, values (sorted by t)
    instants: list[tuple[str, tuple, float, dict]]  # name, lane, t, args

    def named(self, name: str) -> list[_Slice]:
        return [s for s in self.slices if s.name == name]

    def lane_label(self, lane: tuple) -> str:
        return f"{self.process(lane[0])}\n{self.threads.get(lane, f'tid {lane[1]}')}"

    def process(self, pid: object) -> str:
        return self.processes.get(pid, f"pid {pid}")


def _parse(trace: dict) -> _Timeline:
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
            slices.append(_Slice(ev["name"], lane, t, t + ev["dur"] * _US))
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
    return _Timeline(
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
def _round_pairs(tl: _Timeline) -> list[tuple[_Slice, _Slice | None]]:
    """(target.suffix, its concurrent draft.rollout or None) per mirror round.

    A mirror round's suffix and rollout are both submitted after its prefix ends and both
    finish before the next prefix starts, so they pair up between consecutive prefixes.
    """
    prefix_starts = [s.start for s in tl.named(PREFIX)]
    by_round: dict[int, _Slice] = {}
    for r in tl.named(ROLLOUT):
        by_round.setdefault(bisect_right(prefix_starts, r.start), r)
    return [(s, by_round.get(bisect_right(prefix_starts, s.start))) for s in tl.named(SUFFIX)]


def _rounds(tl: _Timeline) -> list[tuple[_Slice, float]]:
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


def _counter_values(tl: _Timeline, name: str, key: str) -> list[float]:
    return [v[key] for n, _, v in tl.counters if n == name and key in v]


def summarize(trace: dict) -> TraceSummary:
    """Busy time, overlap, exposed draft time, rounds, hits and fallbacks of one trace.

    Raises TraceError if `trace` does not have the Chrome trace shape.
    """
    tl = _parse(trace)
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


# --- timeline plot -------------------------------------------------------------------------
# node -> (short label drawn on the bar, legend label, colour)
_STAGES = {
    PREFILL: ("prefill", "target prefill", "#bdbdbd"),
    PREFIX: ("prefix", "target prefix + exit head", "#6baed6"),
    SUFFIX: ("suffix", "target suffix", "#2171b5"),
    VERIFY: ("verify", "target verify (full forward)", "#08306b"),
    CHAIN: ("chain", "draft chain (exposed)", "#d62728"),
    ROLLOUT: ("rollout", "draft branch rollouts", "#fd8d3c"),
}
_OTHER = "#969696"
_FLOWS = {TOKEN_CHANNEL: "#6a3d9a", RENDEZVOUS: "#238b45"}


def _window(tl: _Timeline, max_rounds: int | None) -> tuple[float, float, list[float]]:
    """(start, end, round ends) of the first `max_rounds` rounds; prefill is left out."""
    ends = [end for _, end in _rounds(tl)]
    body = [s for s in tl.slices if s.name != PREFILL] or tl.slices
    t_lo = min(s.start for s in body)
    if max_rounds is None or len(ends) <= max_rounds:
        return t_lo, max(s.end for s in body), ends
    return t_lo, ends[max_rounds - 1], ends[:max_rounds]


def _round_notes(tl: _Timeline, ends: list[float], k: int) -> list[str]:
    """Labels for round k, longest first: 'round k · a=… · hit' from the counters emitted
    just after the round ends, down to the bare round number."""
    mine = {n: v for n, t, v in reversed(tl.counters) if bisect_right(ends, t) - 1 == k}
    facts = ""
    if "accepted" in mine.get("accepted", {}):
        facts += f" · a={mine['accepted']['accepted']:.0f}"
    if "hit" in mine.get("hits", {}):
        facts += " · hit" if mine["hits"]["hit"] else " · miss"
    n = k + 1
    return [f"round {n}{facts}", f"{n}{facts}", f"round {n}", str(n)]


def plot_timeline(trace: dict, path: str | Path, max_rounds: int | None = 4) -> Path:
    """Draw the first `max_rounds` rounds (None: the whole trace) as a PNG timeline.

    One lane per device pipeline, a bar per slice coloured by stage, arrows for the token
    channel and rendezvous flows, dotted lines between rounds. Needs matplotlib
    (`pip install mirror-sd[plot]`); uses the Agg canvas, never a GUI backend.
    Returns the path written. Raises TraceError if the trace has no slices, ValueError if
    `max_rounds` < 1.
    """
    if max_rounds is not None and max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1 or None (the whole trace), got {max_rounds}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_timeline needs matplotlib: pip install 'mirror-sd[plot]'") from exc
    tl = _parse(trace)
    if not tl.slices:
        raise TraceError("the trace has no 'X' slices to draw")
    t_lo, t_hi, ends = _window(tl, max_rounds)
    used = {s.lane for s in tl.slices}  # in metadata order (target device first), then the rest
    lanes = [ln for ln in tl.threads if ln in used] + sorted(used - set(tl.threads), key=str)
    y = {ln: len(lanes) - 1 - i for i, ln in enumerate(lanes)}  # first lane on top
    fig = Figure(figsize=(11, 1.6 + 1.0 * len(lanes)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    def ms(t: float) -> float:  # trace seconds -> ms since the window start
        return (t - t_lo) * 1e3

    span_ms = ms(t_hi) or 1.0
    char_ms = span_ms / (fig.get_figwidth() * 0.8 * fig.dpi) * 5.8  # one label character
    drawn = _draw_slices(ax, tl, y, t_lo, t_hi, ms, char_ms)
    drawn |= _draw_flows(ax, tl, y, t_lo, t_hi, ms)
    _draw_rounds(ax, tl, ends, len(lanes), ms, char_ms)
    for name, lane, t, _ in tl.instants:
        if t_lo <= t <= t_hi and lane in y:
            ax.axvline(ms(t), color="#e31a1c", lw=1.5)
            ax.text(ms(t), y[lane] + 0.42, f" {name}", color="#e31a1c", fontsize=7, va="bottom")
    ax.set_yticks(list(y.values()), [tl.lane_label(ln) for ln in y], fontsize=8)
    ax.set_ylim(-0.6, len(lanes) - 0.1)
    ax.set_xlim(-0.01 * span_ms, span_ms * 1.01)
    ax.set_xlabel(f"ms from the first round's start (trace time {t_lo * 1e3:.1f} ms)")
    ax.grid(axis="x", color="#eeeeee")
    ax.set_axisbelow(True)
    shown = "all rounds" if max_rounds is None else f"first {min(max_rounds, len(ends))} rounds"
    ax.set_title(f"Mirror-SD timeline: {shown}", fontsize=11)
    _legend(ax, drawn)
    path = Path(path)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _draw_slices(ax, tl: _Timeline, y: dict, t_lo: float, t_hi: float, ms, char_ms: float) -> set:
    """Bars for the slices inside [t_lo, t_hi]; returns the node names drawn."""
    drawn = set()
    for s in tl.slices:
        if s.end < t_lo or s.start > t_hi:
            continue
        a, b = max(s.start, t_lo), min(s.end, t_hi)
        short, _, colour = _STAGES.get(s.name, (s.name, s.name, _OTHER))
        drawn.add(s.name)
        ax.barh(y[s.lane], ms(b) - ms(a), left=ms(a), height=0.6, color=colour,
                edgecolor="white", linewidth=0.8)  # fmt: skip
        if (ms(b) - ms(a)) > char_ms * (len(short) + 1):
            dark = colour in ("#2171b5", "#08306b", "#d62728")
            ax.text((ms(a) + ms(b)) / 2, y[s.lane], short, ha="center", va="center",
                    fontsize=7, color="white" if dark else "black")  # fmt: skip
    return drawn


def _draw_flows(ax, tl: _Timeline, y: dict, t_lo: float, t_hi: float, ms) -> set:
    """Arrows for the flows that start inside [t_lo, t_hi]; returns the flow names drawn."""
    drawn = set()
    for name, src, t_src, dst, t_dst in tl.flows:
        if src not in y or dst not in y or not (t_lo <= t_src <= t_hi):
            continue
        drawn.add(name)
        down = y[dst] < y[src]
        y0 = y[src] + (-0.3 if down else 0.3)
        y1 = y[dst] + (0.3 if down else -0.3)
        ax.annotate("", xy=(ms(t_dst), y1), xytext=(ms(t_src), y0),
                    arrowprops={"arrowstyle": "-|>", "color": _FLOWS.get(name, "black"),
                                "lw": 1.3, "shrinkA": 0, "shrinkB": 0})  # fmt: skip
    return drawn


def _draw_rounds(ax, tl: _Timeline, ends: list[float], n_lanes: int, ms, char_ms: float) -> None:
    """Dotted lines between rounds; above each, its note, or just its number if narrow."""
    starts = [0.0] + [ms(e) for e in ends[:-1]]
    for k, (a, b) in enumerate(zip(starts, (ms(e) for e in ends), strict=True)):
        if k:
            ax.axvline(a, color="#555555", lw=0.8, ls=":")
        fits = [n for n in _round_notes(tl, ends, k) if (len(n) + 2) * char_ms < b - a]
        if fits:
            ax.text((a + b) / 2, n_lanes - 0.35, fits[0], ha="center", va="bottom",
                    fontsize=8, color="#333333")  # fmt: skip


def _legend(ax, drawn: set) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=label) for n, (_, label, c) in _STAGES.items() if n in drawn]
    if drawn - set(_STAGES) - set(_FLOWS):
        handles.append(Patch(color=_OTHER, label="other stages"))
    handles += [
        Line2D([], [], color=c, lw=1.3, marker=">", label=n)
        for n, c in _FLOWS.items()
        if n in drawn
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4,
              fontsize=8, frameon=False)  # fmt: skip


# --- command line ----------------------------------------------------------------------------
def main_summarize(path: str | Path, png: str | Path | None = None, max_rounds: int = 4) -> int:
    """`mirror-sd trace summarize PATH [--png FILE]`: print the table, optionally draw.

    Returns the exit status: 0, or 2 with the reason on stderr if the trace is unreadable or
    the PNG cannot be drawn or written.
    """
    try:
        trace = load_trace(path)
        print(f"trace: {path}")
        print(summarize(trace).table())
        if png is not None:
            print(f"timeline: {plot_timeline(trace, png, max_rounds=max_rounds)}")
    except (TraceError, ImportError, OSError, ValueError) as exc:
        print(f"mirror-sd trace summarize: {exc}", file=sys.stderr)
        return 2
    return 0
