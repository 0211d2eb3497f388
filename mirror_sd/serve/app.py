"""The routes: OpenAI's /v1/chat/completions, /v1/completions, /v1/models, plus /health and
/metrics, on Starlette. Every error is an OpenAI error body; no traceback reaches a client.

A server serves one or several targets (`Served`: an engine and its metrics each); a request's
`model` picks the target, and requests to different targets run on their own engines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mirror_sd.serve import sse
from mirror_sd.serve.config import DISCONNECT_POLL_S, OWNED_BY, RETRY_AFTER_S, ServeConfig
from mirror_sd.serve.engine import Delta, Engine, Event, Failed, Finished, QueueFullError, Ticket
from mirror_sd.serve.errors import ApiError, internal
from mirror_sd.serve.metrics import CONTENT_TYPE, ServeMetrics, render_many
from mirror_sd.serve.schemas import CHAT, COMPLETION, GenRequest, Reply, parse

log = logging.getLogger("mirror_sd.serve")
CLIENT_GONE = 499  # the status counted for a non-streaming request whose client left (nginx's)


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""


@dataclass(frozen=True)
class Served:
    """One target the server serves: the engine that owns its plan, and its metrics."""

    engine: Engine
    metrics: ServeMetrics


class Routes:
    """The handlers over the served targets (`served`: model id -> `Served`, in the order `/v1/models`
    lists them); `app()` builds the Starlette application.

    With one target its metrics are the server's (as they always were); with several, each
    target's series carry a `model` label and the requests that name no target (`/health`,
    `/v1/models`, an unknown model, ...) are counted without one.
    """

    def __init__(self, models: Mapping[str, Served], config: ServeConfig):
        if not models:
            raise ValueError("Routes: no model to serve; give at least one")
        self.served, self.config = dict(models), config
        only = next(iter(self.served.values()))
        self.metrics = only.metrics if len(self.served) == 1 else ServeMetrics()
        self.started = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completion, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        handlers = {HTTPException: _http_error, Exception: _unexpected}
        return Starlette(routes=routes, exception_handlers=handlers)

    # --- small endpoints ------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The first target's engine (the only one on a server of one target)."""
        return next(iter(self.served.values())).engine

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": OWNED_BY}

    async def models(self, request: Request) -> Response:
        cards = [self._model_card(name) for name in self.served]
        return self._count("/v1/models", JSONResponse({"object": "list", "data": cards}))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.served:
            return self._count("/v1/models/{model}", self._unknown_model(name).response())
        return self._count("/v1/models/{model}", JSONResponse(self._model_card(name)))

    async def health(self, request: Request) -> Response:
        """Totals over the targets (the first one's id as `model`); several: `models` too."""
        each = {name: served.engine.stats() for name, served in self.served.items()}
        body = {"status": "ok", "model": next(iter(self.served)),
                "queued": sum(s.queued for s in each.values()),
                "running": sum(s.running for s in each.values()),
                "draft_disabled": any(s.draft_disabled for s in each.values())}  # fmt: skip
        if len(each) > 1:
            body["models"] = {name: {"queued": s.queued, "running": s.running,
                                     "draft_disabled": s.draft_disabled}
                              for name, s in each.items()}  # fmt: skip
        return self._count("/health", JSONResponse(body))

    async def prometheus(self, request: Request) -> Response:
        self.metrics.requests.labels("/metrics", "200").inc()
        if len(self.served) == 1:
            return Response(self.metrics.render(), media_type=CONTENT_TYPE)
        per_model = {name: served.metrics for name, served in self.served.items()}
        return Response(render_many(self.metrics, per_model), media_type=CONTENT_TYPE)

    # --- generation -----------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, CHAT, "/v1/chat/completions")

    async def completion(self, request: Request) -> Response:
        return await self._generate(request, COMPLETION, "/v1/completions")

    async def _generate(self, request: Request, kind: str, endpoint: str) -> Response:
        t0 = time.perf_counter()
        headers, metrics = None, self.metrics  # the target's metrics once the model is known
        try:
            req = parse(kind, await _json_body(request), self.config.default_max_tokens)
            served = self.served.get(req.model)
            if served is None:
                raise self._unknown_model(req.model)
            metrics = served.metrics
            ticket = Ticket(req, asyncio.get_running_loop())
            try:
                served.engine.submit(ticket)
            except QueueFullError as exc:
                headers = {"Retry-After": str(RETRY_AFTER_S)}
                raise ApiError(429, f"the request queue is full: {exc}",
                               type="rate_limit_error", code="queue_full") from None  # fmt: skip
            first = await self._next(ticket, request)
            if isinstance(first, Failed):
                raise first.error
            if req.stream:
                return StreamingResponse(
                    self._stream(ticket, req, first, t0, endpoint, metrics),
                    media_type=sse.MEDIA_TYPE, headers=sse.HEADERS,
                )  # fmt: skip
            response = await self._whole(ticket, req, first, request, t0, endpoint, metrics)
        except ApiError as exc:
            response = exc.response(headers)
        except ClientGone:
            metrics.disconnects.inc()
            response = Response(status_code=CLIENT_GONE)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    async def _next(self, ticket: Ticket, request: Request) -> Event:
        """The ticket's next event; cancels the ticket and raises ClientGone if the client left."""
        get = asyncio.ensure_future(ticket.next_event())
        while True:
            done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
            if done:
                return get.result()
            if await request.is_disconnected():
                get.cancel()
                ticket.cancel()
                raise ClientGone

    async def _whole(
        self, ticket, req: GenRequest, event: Event, request, t0, endpoint, metrics: ServeMetrics
    ) -> Response:
        """Collect the events into one response body."""
        parts: list[str] = []
        while not isinstance(event, Finished):
            if isinstance(event, Failed):
                raise event.error
            if not parts:
                metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)
            parts.append(event.text)
            event = await self._next(ticket, request)
        reply = Reply(req).full("".join(parts), event.finish_reason, event.usage, event.token_ids)
        return JSONResponse(reply)

    async def _stream(
        self, ticket, req: GenRequest, event: Event, t0, endpoint, metrics: ServeMetrics
    ) -> AsyncIterator[str]:
        """SSE chunks from the events; a client that goes away cancels the ticket."""
        reply, finished, sent_text = Reply(req), False, False
        try:
            if req.kind == CHAT:
                yield sse.event(reply.chunk("", first=True))
            while True:
                if isinstance(event, Delta):
                    if not sent_text:
                        metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)
                        sent_text = True
                    yield sse.event(reply.chunk(event.text))
                elif isinstance(event, Finished):
                    yield sse.event(
                        reply.chunk(None, event.finish_reason, token_ids=event.token_ids)
                    )
                    if req.include_usage:
                        yield sse.event(reply.usage_chunk(event.usage))
                    break
                else:  # Failed after the stream began: the error as a last event
                    yield sse.event(event.error.body())
                    break
                event = await ticket.next_event()
            yield sse.DONE
            finished = True
        finally:
            if not finished:
                ticket.cancel()
                metrics.disconnects.inc()
            metrics.requests.labels(endpoint, "200").inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    # --- helpers --------------------------------------------------------------------------------
    def _unknown_model(self, name: str) -> ApiError:
        known = ", ".join(repr(m) for m in self.served)
        return ApiError(404, f"model {name!r} does not exist; this server serves {known} "
                        "(GET /v1/models lists them)",
                        param="model", code="model_not_found")  # fmt: skip

    def _count(self, endpoint: str, response: Response) -> Response:
        """Count `response` under `endpoint`, the route's template (bounded label values)."""
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response


async def _json_body(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body: not valid JSON ({exc}); send a JSON object with "
                       "Content-Type: application/json") from None  # fmt: skip


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, wrong method) as OpenAI error bodies."""
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return ApiError(exc.status_code, message, type=kind).response(exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback on the server; the client gets a plain 500."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal().response()
