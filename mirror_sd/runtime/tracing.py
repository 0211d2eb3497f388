"""Tracer: frozen events of one generation, written as Chrome trace JSON (opens in Perfetto).

One process per device (named with its backend and execution provider), one thread per
pipeline, an "X" slice per stage run named by graph node, "s"/"f" flow arrows for
token-channel messages and rendezvous, "C" counters, "i" instant markers (fallbacks).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Event:
    ph: str  # X slice | s/f flow | C counter | i instant
    name: str
    device: str
    pipeline: str
    ts: float  # seconds since the tracer started
    dur: float = 0.0
    args: tuple[tuple[str, object], ...] = ()
    flow_id: int | None = None


@dataclass
class Tracer:
    """Thread-safe event recorder. Devices and pipelines are registered with labels first."""

    clock: callable = time.perf_counter
    events: list[Event] = field(default_factory=list)
    devices: dict[str, str] = field(default_factory=dict)  # alias -> label
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.t0 = self.clock()

    def now(self) -> float:
        return self.clock() - self.t0

    def add_device(self, alias: str, label: str) -> None:
        self.devices[alias] = label

    def _add(self, e: Event) -> None:
        with self._lock:
            self.events.append(e)

    def slice(
        self, device: str, pipeline: str, name: str, start: float, end: float, **args
    ) -> None:
        self._add(Event("X", name, device, pipeline, start, end - start, tuple(args.items())))

    def flow(self, name: str, src: tuple[str, str, float], dst: tuple[str, str, float]) -> None:
        """An arrow from (device, pipeline, t) to (device, pipeline, t)."""
        fid = next(self._ids)
        self._add(Event("s", name, src[0], src[1], src[2], flow_id=fid))
        self._add(Event("f", name, dst[0], dst[1], dst[2], flow_id=fid))

    def counter(self, name: str, t: float, **values: float) -> None:
        self._add(Event("C", name, "scheduler", "scheduler", t, args=tuple(values.items())))

    def instant(self, device: str, pipeline: str, name: str, t: float, **args) -> None:
        self._add(Event("i", name, device, pipeline, t, args=tuple(args.items())))

    # --- export -------------------------------------------------------------------------
    def to_chrome(self) -> dict:
        """The Chrome trace event format: {"traceEvents": [...], "displayTimeUnit": "ms"}."""
        aliases = list(self.devices) + sorted({e.device for e in self.events} - set(self.devices))
        pid = {a: i + 1 for i, a in enumerate(aliases)}
        threads = sorted({(e.device, e.pipeline) for e in self.events})
        tid = {t: i + 1 for i, t in enumerate(threads)}
        out: list[dict] = []
        for a in aliases:
            label = f"{a} ({self.devices[a]})" if a in self.devices else a
            out.append({"ph": "M", "name": "process_name", "pid": pid[a], "args": {"name": label}})
        for d, p in threads:
            out.append(
                {
                    "ph": "M",
                    "name": "thread_name",
                    "pid": pid[d],
                    "tid": tid[(d, p)],
                    "args": {"name": p},
                }
            )
        for e in sorted(self.events, key=lambda e: e.ts):
            ev = {"ph": e.ph, "name": e.name, "pid": pid[e.device], "tid": tid[(e.device, e.pipeline)],
                  "ts": round(e.ts * 1e6, 3), "args": dict(e.args)}  # fmt: skip
            if e.ph == "X":
                ev["dur"] = round(e.dur * 1e6, 3)
            elif e.ph in ("s", "f"):
                ev.update(id=e.flow_id, cat="channel")
                if e.ph == "f":
                    ev["bp"] = "e"
            elif e.ph == "i":
                ev["s"] = "p"
            out.append(ev)
        return {"traceEvents": out, "displayTimeUnit": "ms"}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_chrome()))
        return path
