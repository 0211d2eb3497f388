"""Spec-Bench harness: HF baselines and our plan's modes on the same models, same prompts.

    specbench  the questions (six tasks, first turn)
    methods    hf-ar, hf-assisted, hf-pld, ar, speculative, mirror
    runner     run every method on every question; losslessness checks
    report     aggregates, results.json / results.md / speedup.png / answers/*.jsonl
    simulate   PREDICTED replays of measured rounds on a cost profile of other hardware
    cli        the `mirror-sd bench` subcommand

The names below load lazily, so `mirror-sd --help` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchConfig": "runner",
    "run_bench": "runner",
    "measure_profile": "simulate",
    "run_simulation": "simulate",
    "simulate": "simulate",
    "TASKS": "specbench",
    "Question": "specbench",
    "load_questions": "specbench",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mirror_sd.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mirror_sd.bench.{_EXPORTS[name]}"), name)
