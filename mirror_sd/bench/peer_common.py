"""What every benchmark peer shares (OpenVINO GenAI in bench/peers.py, llama.cpp in
bench/llamacpp.py): the error for a peer that cannot run, the slot that holds the loaded
pipelines and warms each one after it loads, and the prompt-lookup settings.

Warm-up rule (the same as ours, runner.py): one untimed generation after a pipeline loads,
before its first timed call. A pipeline that is freed and loaded again (one pipeline in
memory at a time) is warmed again; the slot counts loads and warm-ups per pipeline.
"""

from __future__ import annotations

import gc
import sys
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

PLD_ASSISTANT_TOKENS = 10  # as hf-pld's prompt_lookup_num_tokens (Spec-Bench's PLD baseline)
PLD_MAX_NGRAM = 3  # openvino.genai's prompt-lookup sample value (llama-pld takes the same)


class PeersUnavailableError(ValueError):
    """A peer method (ov-*, llama-*) was chosen but its package or its models cannot be used."""


def say(progress: bool, message: str) -> None:
    """One progress line on stderr (peers convert and assemble models before a run)."""
    if progress:
        print(f"[mirror-sd peers] {message}", file=sys.stderr, flush=True)


def dist_version(dist: str) -> str | None:
    """The installed version of the distribution `dist`, None where it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo 'flags'); empty off Linux."""
    with_file = Path("/proc/cpuinfo")
    if with_file.is_file():
        for line in with_file.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


class PipelineSlot:
    """The pipelines of one run's peers by key, built on first use and warmed before their
    first timed call. `resident`: keep every one; else keep at most one, freeing it before
    another key loads (the next load of the freed key is warmed again)."""

    def __init__(self, resident: bool = True):
        self.resident = resident
        self._pipes: dict[str, object] = {}
        self._cold: set[str] = set()  # loaded, not warmed yet
        self.loads: Counter[str] = Counter()
        self.warmups: Counter[str] = Counter()

    def get(
        self, key: str, build: Callable[[], object], warm: Callable[[object], None] | None = None
    ):
        """The pipeline of `key`, built with `build()` when it is not loaded; `warm(pipe)` runs
        (untimed, by the caller's clock) when it was not warmed since it loaded."""
        if key not in self._pipes:
            if not self.resident and self._pipes:
                self._pipes.clear()
                self._cold.clear()
                gc.collect()  # a C++ pipeline goes with its last reference
            self._pipes[key] = build()
            self.loads[key] += 1
            self._cold.add(key)
        pipe = self._pipes[key]
        if warm is not None and key in self._cold:
            warm(pipe)
            self.warmups[key] += 1
            self._cold.discard(key)
        return pipe

    def loaded(self) -> dict[str, object]:
        """The pipelines in memory now, by key."""
        return dict(self._pipes)

    def describe(self, key: str) -> str:
        """'loaded N time(s), warmed N time(s)': for results.json (every load must be warmed)."""
        return f"loaded {self.loads[key]} time(s), warmed {self.warmups[key]} time(s)"
