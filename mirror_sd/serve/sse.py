"""Server-sent events as OpenAI streams them: `data: {json}` lines, then `data: [DONE]`."""

from __future__ import annotations

import json

MEDIA_TYPE = "text/event-stream"
DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def event(body: dict) -> str:
    """One SSE event carrying `body` as compact JSON (a JSON line has no raw newline)."""
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
