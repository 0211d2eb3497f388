"""The journals the long runs append to (one JSON value a line, written as each piece ends):
read back as far as they are whole, and a Spec-Bench run's records as a reference."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list:
    """Every JSON line of `path` ([] when there is no file); blank lines and the line an
    interruption cut short are skipped."""
    out = []
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in filter(str.strip, lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # cut short by an interruption
            continue
    return out


def first_pass_records(run_dir: Path | str) -> list[dict]:
    """The records of a `mirror-sd bench --out` folder's first pass (records.jsonl, read as it
    stands: a run still writing can serve). Raises ValueError when it holds no records.jsonl."""
    path = Path(run_dir) / "records.jsonl"
    if not path.is_file():
        raise ValueError(f"--reference {run_dir}: no records.jsonl there (a `mirror-sd bench "
                         "--out DIR` run writes one)")  # fmt: skip
    return [r for group in read_jsonl(path) for r in group if r.get("repeat", 0) == 0]
