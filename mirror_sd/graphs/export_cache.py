"""The ONNX export cache on disk: list its entries and prune the least recently used.

Every entry `<cache>/onnx/<name>-<hash>/` is self-contained (`model.onnx` + external data) and
`export_cached` rebuilds any missing one on demand, so pruning never breaks anything: the next
plan that needs an entry exports it again. A saved plan (`mirror_sd.save`) holds its own copy
of its ONNX files and is never affected. `export_cached` touches an entry each time it reuses
one, so an entry's mtime is its last use.

A 1.5B target's per-layer export is ~6 GB of float32 (every ℓe's split is spliced from it
beside its parts, `graphs.layered`, and adds a few hundred KB); each other model, quantization
or vocabulary trim adds an entry, so without pruning the cache grows by gigabytes over many
experiments.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class Entry:
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch (the folder's mtime)

    @property
    def name(self) -> str:
        return self.path.name


def entries(folder: str | Path) -> list[Entry]:
    """The complete entries under `folder` (a folder holding `model.onnx`), least recently used
    first. Half-written temporary folders (`.<name>.tmp-*`) are not entries."""
    root = Path(folder)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith(".") and (p / "model.onnx").is_file():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            out.append(Entry(p, size, p.stat().st_mtime))
    return sorted(out, key=lambda e: (e.last_used, e.name))


def prune(folder: str | Path, max_gb: float | None = None, older_than_days: float | None = None,
          dry_run: bool = False, now: float | None = None) -> list[Entry]:  # fmt: skip
    """Remove entries unused for more than `older_than_days`, then the least recently used
    until the rest fit in `max_gb`. Returns the removed entries (only listed with `dry_run`).

    Raises:
        ValueError: neither limit is given, or a limit is negative.
    """
    if max_gb is None and older_than_days is None:
        raise ValueError("prune needs a limit: max_gb (keep at most this many GB) and/or "
                         "older_than_days (remove entries unused for longer)")  # fmt: skip
    if (max_gb is not None and max_gb < 0) or (older_than_days is not None and older_than_days < 0):
        raise ValueError(
            f"limits must be >= 0, got max_gb={max_gb}, older_than_days={older_than_days}"
        )
    now = time.time() if now is None else now
    kept, removed = entries(folder), []
    if older_than_days is not None:
        cutoff = now - older_than_days * 86400
        removed = [e for e in kept if e.last_used < cutoff]
        kept = [e for e in kept if e.last_used >= cutoff]
    if max_gb is not None:
        while kept and sum(e.bytes for e in kept) > max_gb * GB:
            removed.append(kept.pop(0))  # least recently used first
    if not dry_run:
        for e in removed:
            shutil.rmtree(e.path)
    return removed


def table(items: list[Entry], now: float | None = None) -> str:
    """One line per entry: size, days since last use, name; then the total."""
    now = time.time() if now is None else now
    lines = [
        f"{e.bytes / GB:8.2f} GB  {(now - e.last_used) / 86400:6.1f} d  {e.name}" for e in items
    ]
    lines.append(f"{sum(e.bytes for e in items) / GB:8.2f} GB  in {len(items)} entries")
    return "\n".join(lines)
