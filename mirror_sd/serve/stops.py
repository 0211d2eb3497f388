"""Stop strings the OpenAI way: the returned text ends before the first stop string.

The plan stops generating once a stop string appears and keeps the token that completed it
(runtime/plan.py); a client must not see the stop string, and a stream must not send text
that later turns out to begin one. `StopCutter` holds back a tail that could still grow
into a stop string and cuts at the first one.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopCutter:
    """Feed it the streamed pieces; it returns what is safe to send so far."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""  # everything fed
        self.sent = 0  # characters of `text` already returned
        self.stopped = False  # a stop string was found: nothing more is returned

    def feed(self, piece: str) -> str:
        """The newly safe text after `piece` arrived ('' while a stop string may be forming)."""
        self.text += piece
        return self._release(final=False)

    def finish(self) -> str:
        """What was held back, cut at a stop string if one is there."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            end = cut
        else:
            end = len(self.text) if final else len(self.text) - self._held_tail()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _first_stop(self) -> int | None:
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held_tail(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
