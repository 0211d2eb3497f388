"""Where a sequence's output ends: after its first EOS token or the token completing a stop
string (shared by batch-1 and batched generation)."""

from __future__ import annotations

from collections.abc import Sequence


def truncate(produced: list[int], eos: set[int], stop_strings: Sequence[str], tok) -> list[int]:
    """Cut after the first EOS token, or after the token that completes a stop string."""
    for i, t in enumerate(produced):
        if t in eos:
            return produced[: i + 1]
    if stop_strings and any(
        s in tok.decode(produced, skip_special_tokens=True) for s in stop_strings
    ):  # one decode per call when no stop string is there (the common case, every round)
        for i in range(len(produced)):
            text = tok.decode(produced[: i + 1], skip_special_tokens=True)
            if any(s in text for s in stop_strings):
                return produced[: i + 1]
    return produced
