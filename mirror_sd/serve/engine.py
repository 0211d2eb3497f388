"""The engine: owns the plan, takes requests from a bounded FIFO queue, streams events back.

The HTTP side talks to an engine through three calls — `submit(ticket)`, `stats()`,
`close()` — and reads each request's events (`Delta`, `Finished`, `Failed`) from its
`Ticket`; a ticket's `cancel()` (the client went away) must stop that generation and free
its place. `SerialEngine` runs one generation at a time on a worker thread (a Plan serves
one generation at a time). A batched engine keeps the same interface and runs many tickets
per round, a new ticket joining at the next round boundary (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from mirror_sd.runtime.prompts import eos_token_ids
from mirror_sd.runtime.results import GenerationResult
from mirror_sd.serve.errors import ApiError, from_plan_error, internal
from mirror_sd.serve.schemas import GenRequest, Usage
from mirror_sd.serve.stops import StopCutter

log = logging.getLogger("mirror_sd.serve")


# --- events a ticket receives, in order: Delta*, then Finished or Failed ----------------------
@dataclass(frozen=True)
class Delta:
    text: str  # new text, safe to send (stop strings already cut)


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)
    usage: Usage
    cancelled: bool = False
    token_ids: tuple[int, ...] = ()  # every generated token (EOS included, as `usage` counts)


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Delta | Finished | Failed


class QueueFullError(Exception):
    """The engine's queue holds `max_queue` requests already."""


class Ticket:
    """One request inside the engine: its `GenRequest`, its events, its cancel flag.

    Made on the event loop's thread; the engine's threads call `emit` and read `cancelled`.
    """

    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.submitted_at = time.perf_counter()
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancel = threading.Event()

    def emit(self, event: Event) -> None:
        """Hand `event` to the request's handler (thread-safe; dropped once the loop is gone)."""
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next_event(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        """The client went away: stop generating for it at the next round boundary."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


@dataclass(frozen=True)
class EngineStats:
    queued: int  # tickets waiting
    running: int  # sequences generating now
    kv_rows_in_use: int  # target KV-cache rows held by running sequences
    kv_rows_capacity: int  # rows the target's cache has (the plan's max_len per sequence)
    draft_disabled: bool  # the plan does not use its draft device: a call hung, not returned


class Engine(Protocol):
    """What the HTTP side needs from an engine; `BatchEngine` implements the same."""

    name: str  # "batch" or "serial" (the server's startup line names it)

    def submit(self, ticket: Ticket) -> None:
        """Queue `ticket`; raise QueueFullError when the queue is full."""
        ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None:
        """Stop after the generation in flight; queued tickets get a 503."""
        ...


class GenerationObserver(Protocol):
    """Told about each finished generation (metrics); called on the engine's thread."""

    def queue_wait(self, seconds: float) -> None: ...

    def generation(self, result: GenerationResult, cancelled: bool) -> None: ...


class SerialEngine:
    """One generation at a time on one worker thread that owns `plan` (FIFO order).

    Cancellation is checked after each piece the plan streams (each verified round that
    added text); closing the plan's stream stops both pipelines after the round in flight.
    """

    name = "serial"

    def __init__(self, plan, max_queue: int, observer: GenerationObserver | None = None,
                 prefix_cache: bool = False):  # fmt: skip
        self.plan, self.prefix_cache = plan, prefix_cache
        self.observer = observer
        self._queue: queue.Queue[Ticket | None] = queue.Queue(maxsize=max_queue)
        self._running: Ticket | None = None
        self._eos = eos_token_ids(plan.tokenizer, getattr(plan, "generation_config", None))
        self._closed = False
        self._thread = threading.Thread(
            target=self._loop, name="mirror-sd-serve-engine", daemon=True
        )
        self._thread.start()

    # --- Engine -------------------------------------------------------------------------------
    def submit(self, ticket: Ticket) -> None:
        if self._closed:
            raise QueueFullError("the server is shutting down")
        try:
            self._queue.put_nowait(ticket)
        except queue.Full:
            raise QueueFullError(
                f"{self._queue.maxsize} requests are waiting already; retry later"
            ) from None

    def stats(self) -> EngineStats:
        running = self._running is not None
        target = getattr(self.plan, "target", None)
        return EngineStats(
            queued=self._queue.qsize(),
            running=int(running),
            kv_rows_in_use=int(getattr(target, "length", 0)) if running else 0,
            kv_rows_capacity=int(self.plan.spec.max_len),
            draft_disabled=getattr(self.plan, "draft_disabled", None) is not None,
        )

    def close(self) -> None:
        self._closed = True
        if (running := self._running) is not None:  # stop it at its next round boundary
            running.cancel()
        while True:  # queued tickets will never run
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not None:
                ticket.emit(
                    Failed(ApiError(503, "the server is shutting down", type="server_error"))
                )
        self._queue.put(None)
        self._thread.join()

    # --- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while (ticket := self._queue.get()) is not None:
            if self.observer:
                self.observer.queue_wait(time.perf_counter() - ticket.submitted_at)
            if ticket.cancelled:  # its client left while it waited
                ticket.emit(Finished("stop", Usage(0, 0), cancelled=True))
                continue
            self._running = ticket
            try:
                self._serve(ticket)
            except Exception:  # a bug: log it, tell the client no more than that
                log.exception("generation failed")
                ticket.emit(Failed(internal()))
            finally:
                self._running = None

    def _serve(self, ticket: Ticket) -> None:
        req = ticket.request
        cutter = StopCutter(req.stop)
        streamed, cancelled = "", False
        pieces = self.plan.stream(req.prompt, req.max_tokens, prefix_cache=self.prefix_cache,
                                  **req.plan_kwargs())  # fmt: skip
        try:
            for piece in pieces:
                streamed += piece
                if text := cutter.feed(piece):
                    ticket.emit(Delta(text))
                if ticket.cancelled:
                    cancelled = True
                    break
        except ValueError as exc:
            if streamed:  # the plan checks its input before the first piece: this is a bug
                raise
            ticket.emit(Failed(from_plan_error(exc, req.prompt_param)))  # prompt, context, ...
            return
        finally:
            pieces.close()
        res = self.plan.last_result
        if self.observer:
            self.observer.generation(res, cancelled)
        tail = cutter.feed(res.text[len(streamed) :]) if res.text.startswith(streamed) else ""
        if tail := tail + cutter.finish():
            ticket.emit(Delta(tail))
        ended = cutter.stopped or (res.tokens and res.tokens[-1] in self._eos)
        reason = "length" if not ended and len(res.tokens) >= req.max_tokens else "stop"
        usage = Usage(res.prompt_tokens, len(res.tokens))
        ticket.emit(Finished(reason, usage, cancelled, tuple(res.tokens)))
