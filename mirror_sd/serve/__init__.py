"""`mirror-sd serve`: an OpenAI-compatible HTTP server over a compiled plan.

Layout (docs/serving.md): `config` (every default), `errors` (OpenAI error bodies),
`schemas` (request parsing and validation, response bodies), `stops` (stop strings cut the
OpenAI way), `engine` (the queue and the worker that owns the plan), `metrics` (Prometheus),
`sse` (server-sent events), `app` (the routes), `server` (uvicorn, in this thread or another).
"""

from mirror_sd.serve.config import ServeConfig

__all__ = ["ServeConfig"]
