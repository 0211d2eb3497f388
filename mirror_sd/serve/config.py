"""The server's settings and every default they have (the one place defaults live)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing a server is the user's explicit choice
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 64  # requests waiting for the plan; one more gets 429
DEFAULT_MAX_TOKENS = 256  # when a request names neither max_tokens nor max_completion_tokens
MAX_STOP_STRINGS = 4  # as OpenAI's API
RETRY_AFTER_S = 1  # the Retry-After header of a 429
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks its client is still there
OWNED_BY = "mirror-sd"  # /v1/models' owned_by
# Prometheus histogram buckets
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKENS_PER_ROUND_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
ENGINES = ("batch", "serial")  # continuous batching (plan.batch_session) or one at a time
DEFAULT_ENGINE = "batch"
# reuse the K/V rows of finished requests for a prompt sharing their prefix (chat turns, one
# system prompt; docs/runtime.md, *Prefix caching*): opt-in (`--prefix-cache`), because a
# reused prefix is not computed as a fresh prefill would compute it, so an answer can part
# from `plan.generate`'s (measured: 2-4 of ~30 answers on the int4 SmolLM2 target; docs/soak.md)
DEFAULT_PREFIX_CACHE = False


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs: where it listens, what it calls its model, how long its queue is.

    `model_name` is the id clients send as `model` and `/v1/models` lists (a server of several
    targets takes their ids from its {id: plan} mapping instead, `server.build`); `max_queue`
    bounds the requests waiting for each plan (a full queue answers 429 with Retry-After);
    `engine`:
    `batch` (continuous batching, the default) or `serial` (one generation at a time);
    `prefix_cache`: keep finished requests' K/V rows for later prompts with the same prefix.
    """

    model_name: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_queue: int = DEFAULT_MAX_QUEUE
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    engine: str = DEFAULT_ENGINE
    prefix_cache: bool = DEFAULT_PREFIX_CACHE

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name: empty; give the id clients will send as `model`")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: expected 0..65535 (0 picks a free port)")
        if self.max_queue < 1:
            raise ValueError(f"--max-queue {self.max_queue}: expected a positive integer")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.default_max_tokens < 1:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens}: expected a positive integer"
            )


def check_model_names(names: list[str]) -> None:
    """The ids of a server's targets: at least one, none empty, none twice.

    Raises:
        ValueError: naming the id at fault and how to fix it.
    """
    if not names:
        raise ValueError("no model to serve: give at least one plan folder or model")
    for name in names:
        if not name:
            raise ValueError("--served-model-name: empty; give the id clients will send as `model`")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"model id {twice[0]!r} is served twice (ids: {', '.join(names)}); give each plan "
            "its own --served-model-name, once per plan, in the order of the plans"
        )
