"""`BatchEngine`: continuous batching over `plan.batch_session()` (docs/serving.md, *Engine*).

Same interface as `SerialEngine` (`submit`, `stats`, `close`; a ticket's events). One worker
thread owns a batch session while any ticket is live: at every round boundary it hands each
sequence's new tokens to its ticket, finishes the sequences whose results are ready, cancels
those whose client left (their rows are free for the next admission at once), and admits
waiting tickets in FIFO order while they fit (`BatchFullError`: the head waits). The session
ends when nothing is live or waiting (the plan's busy lock is released), and the next ticket
starts a new one (which tries the draft again, unless a hung draft call has not returned).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from mirror_sd.runtime.batch_session import BatchFullError
from mirror_sd.runtime.prompts import eos_token_ids
from mirror_sd.runtime.results import GenerationResult
from mirror_sd.serve.engine import (
    Delta,
    EngineStats,
    Event,
    Failed,
    Finished,
    GenerationObserver,
    QueueFullError,
    Ticket,
)
from mirror_sd.serve.errors import ApiError, from_plan_error, internal
from mirror_sd.serve.schemas import Usage
from mirror_sd.serve.stops import StopCutter

log = logging.getLogger("mirror_sd.serve")
ONE_PROMPT = "prompts[0]: "  # how a batch's checks name the prompt they reject


@dataclass
class _Live:
    """A ticket admitted into the session: its tokens so far and the text sent."""

    ticket: Ticket
    cutter: StopCutter
    tokens: list[int] = field(default_factory=list)
    streamed: str = ""  # decoded text handed to the cutter (as Plan.stream yields it)
    cancelled: bool = False  # session.cancel was called


class BatchEngine:
    """Many tickets per round on one worker thread that owns a `plan.batch_session()`."""

    name = "batch"

    def __init__(self, plan, max_queue: int, observer: GenerationObserver | None = None,
                 prefix_cache: bool = False):  # fmt: skip
        self.plan, self.prefix_cache = plan, prefix_cache
        self.observer = observer
        self.max_queue = max_queue
        self._waiting: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._live: dict[int, _Live] = {}  # handle -> ticket; the worker's only
        self._running = 0  # snapshots the worker publishes at each round boundary
        self._kv_rows = 0
        self._eos = eos_token_ids(plan.tokenizer, getattr(plan, "generation_config", None))
        self._closed = False
        self._thread = threading.Thread(
            target=self._loop, name="mirror-sd-serve-batch-engine", daemon=True
        )
        self._thread.start()

    # --- Engine -------------------------------------------------------------------------------
    def submit(self, ticket: Ticket) -> None:
        with self._cond:
            if self._closed:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are waiting already; retry later")
            self._waiting.append(ticket)
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            queued = len(self._waiting)
        return EngineStats(
            queued=queued,
            running=self._running,
            kv_rows_in_use=self._kv_rows,
            kv_rows_capacity=int(self.plan.spec.max_len),
            draft_disabled=getattr(self.plan, "draft_disabled", None) is not None,
        )

    def close(self) -> None:
        """Live sequences are cancelled at the next round boundary; waiting tickets get 503."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify()
        for ticket in waiting:
            ticket.emit(Failed(ApiError(503, "the server is shutting down", type="server_error")))
        self._thread.join()

    # --- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            deferred: list[tuple[Ticket, list[Event]]] = []
            try:
                with self.plan.batch_session(prefix_cache=self.prefix_cache) as session:
                    deferred = self._session(session)
            except Exception:  # a bug: log it, tell the clients involved no more than that
                log.exception("batch session failed")
                victims = [lv.ticket for lv in self._live.values()]
                if not victims:  # it failed before admitting anyone: the head must not loop
                    with self._cond:
                        victims = [self._waiting.popleft()] if self._waiting else []
                deferred += [(t, [Failed(internal())]) for t in victims]
            finally:
                self._live.clear()
                self._running = self._kv_rows = 0
            # the last events go out once the plan is free again (a client may use it next)
            self._emit(deferred)

    def _session(self, session) -> list[tuple[Ticket, list[Event]]]:
        """Run rounds while tickets are live; returns the last finished tickets' events."""
        deferred: list[tuple[Ticket, list[Event]]] = []
        self._admit(session, deferred)
        while self._live:
            for deltas in session.rounds():
                deferred += self._boundary(session, deltas)
                if not self._live and not self._has_waiting():
                    break  # nothing left: leave the session before the last events
                deferred = self._emit(deferred)
            else:  # rounds() ended: every sequence finished
                deferred += self._collect(session)
                self._admit(session, deferred)
                if self._live:
                    deferred = self._emit(deferred)
        return deferred

    def _boundary(self, session, deltas: dict[int, list[int]]) -> list:
        """One round's tokens to their tickets; finish, cancel and admit between rounds."""
        if self.observer is not None and hasattr(self.observer, "batch_round"):
            self.observer.batch_round(len(deltas))
        for h, tokens in deltas.items():
            if (live := self._live.get(h)) is not None and tokens:
                self._feed(live, tokens)
        out = self._collect(session)
        closing = self._closed
        for h, live in self._live.items():
            if (closing or live.ticket.cancelled) and not live.cancelled:
                session.cancel(h)  # it leaves before the next round; its rows count as free
                live.cancelled = True
        self._admit(session, out)
        return out

    def _feed(self, live: _Live, tokens: list[int]) -> None:
        live.tokens += tokens
        text = self.plan.tokenizer.decode(live.tokens, skip_special_tokens=True)
        if len(text) > len(live.streamed) and not text.endswith("\ufffd"):
            piece, live.streamed = text[len(live.streamed) :], text
            if sent := live.cutter.feed(piece):
                live.ticket.emit(Delta(sent))

    def _collect(self, session) -> list[tuple[Ticket, list[Event]]]:
        """Finish every live ticket whose result is ready; publish the live count and rows."""
        out = []
        for h in list(self._live):
            try:
                res = session.result(h)
            except KeyError:
                continue
            live = self._live.pop(h)
            out.append((live.ticket, self._finish(live, res)))
        self._publish(session)
        return out

    def _finish(self, live: _Live, res: GenerationResult) -> list[Event]:
        req, cutter = live.ticket.request, live.cutter
        if self.observer:
            self.observer.generation(res, live.cancelled)
        events: list[Event] = []
        streamed = live.streamed
        tail = cutter.feed(res.text[len(streamed) :]) if res.text.startswith(streamed) else ""
        if tail := tail + cutter.finish():
            events.append(Delta(tail))
        ended = cutter.stopped or (res.tokens and res.tokens[-1] in self._eos)
        reason = "length" if not ended and len(res.tokens) >= req.max_tokens else "stop"
        usage = Usage(res.prompt_tokens, len(res.tokens))
        events.append(Finished(reason, usage, live.cancelled, tuple(res.tokens)))
        return events

    def _admit(self, session, out: list) -> None:
        """Admit waiting tickets in FIFO order while they fit beside the live ones."""
        while not self._closed:
            with self._cond:
                if not self._waiting:
                    break
                ticket = self._waiting[0]
            req = ticket.request
            if ticket.cancelled:  # its client left while it waited
                self._pop(ticket)
                out.append((ticket, [Finished("stop", Usage(0, 0), cancelled=True)]))
                continue
            try:
                h = session.admit(req.prompt, req.max_tokens, **req.plan_kwargs())
            except BatchFullError:
                break  # it waits for rows (head of line: later ones wait behind it)
            except ValueError as exc:  # the prompt or a setting: the plan's own checks
                if (msg := str(exc)).startswith(ONE_PROMPT):  # one prompt: no index to name
                    exc = type(exc)(msg.removeprefix(ONE_PROMPT))
                self._pop(ticket)
                out.append((ticket, [Failed(from_plan_error(exc, req.prompt_param))]))
                continue
            self._pop(ticket)
            if self.observer:
                self.observer.queue_wait(time.perf_counter() - ticket.submitted_at)
            self._live[h] = _Live(ticket, StopCutter(req.stop))
        self._publish(session)

    def _pop(self, ticket: Ticket) -> None:
        with self._cond:
            if self._waiting and self._waiting[0] is ticket:
                self._waiting.popleft()

    def _has_waiting(self) -> bool:
        with self._cond:
            return bool(self._waiting) and not self._closed

    def _publish(self, session) -> None:
        self._running = len(self._live)
        self._kv_rows = int(session.rows_in_use)

    @staticmethod
    def _emit(batch: list[tuple[Ticket, list[Event]]]) -> list:
        for ticket, events in batch:
            for event in events:
                ticket.emit(event)
        return []
