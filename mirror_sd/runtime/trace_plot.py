"""Draw the first rounds of a Chrome trace that `Tracer` wrote as a PNG timeline.

    plot_timeline(load_trace("trace.json"), "timeline.png")   # needs matplotlib

One lane per device pipeline, a bar per slice coloured by stage, arrows for the token
channel and rendezvous flows, dotted lines between rounds with each round's accepted tokens
and hit or miss. Reading and checking the trace is `trace_tools`'.
"""

from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

from mirror_sd.runtime.trace_tools import (
    CHAIN,
    PREFILL,
    PREFIX,
    RENDEZVOUS,
    ROLLOUT,
    SUFFIX,
    TOKEN_CHANNEL,
    VERIFY,
    Timeline,
    TraceError,
    parse_timeline,
    verification_rounds,
)

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


def _window(tl: Timeline, max_rounds: int | None) -> tuple[float, float, list[float]]:
    """(start, end, round ends) of the first `max_rounds` rounds; prefill is left out."""
    ends = [end for _, end in verification_rounds(tl)]
    body = [s for s in tl.slices if s.name != PREFILL] or tl.slices
    t_lo = min(s.start for s in body)
    if max_rounds is None or len(ends) <= max_rounds:
        return t_lo, max(s.end for s in body), ends
    return t_lo, ends[max_rounds - 1], ends[:max_rounds]


def _round_notes(tl: Timeline, ends: list[float], k: int) -> list[str]:
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
    tl = parse_timeline(trace)
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


def _draw_slices(ax, tl: Timeline, y: dict, t_lo: float, t_hi: float, ms, char_ms: float) -> set:
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


def _draw_flows(ax, tl: Timeline, y: dict, t_lo: float, t_hi: float, ms) -> set:
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


def _draw_rounds(ax, tl: Timeline, ends: list[float], n_lanes: int, ms, char_ms: float) -> None:
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
