"""`mirror-sd serve`: an OpenAI-compatible HTTP server over a compiled plan.

Layout (docs/serving.md): `config` (every default), `errors` (OpenAI error bodies),
`schemas` (request parsing and validation, response bodies), `stops` (stop strings cut the
OpenAI way), `engine` (the engine interface, tickets, events, the serial engine),
`batch_engine` (continuous batching over a plan's batch session, the default), `metrics`
(Prometheus),
`sse` (server-sent events), `app` (the routes), `server` (uvicorn, in this thread or another).
"""

from mirror_sd.serve.config import ServeConfig

__all__ = ["ServeConfig"]
