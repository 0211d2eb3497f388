"""A bounded load run against a running server (loopback): requests/s, latency and TTFT.

`run_load` sends streamed chat requests from `clients` threads through the official openai
client until `requests` are done or `duration_s` has passed (at most MAX_DURATION_S), and
reports what a user of the server sees. scripts/serve_load.py is its command line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

MAX_DURATION_S = 60.0  # a load run never runs longer
DEFAULT_PROMPTS = (
    "Write a Python function that reverses a string.",
    "Explain what a hash map is in two sentences.",
    "Write a SQL query that counts rows per day.",
    "What does the `yield` keyword do in Python?",
)


@dataclass(frozen=True)
class LoadReport:
    clients: int
    requests: int  # finished without error
    errors: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float  # completion tokens over the wall time, all clients together
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_p95_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown_row(self) -> str:
        return (
            f"| {self.clients} | {self.requests} | {self.errors} | {self.requests_per_s:.2f} | "
            f"{self.tokens_per_s:.1f} | {self.latency_p50_s:.2f} | {self.latency_p99_s:.2f} | "
            f"{self.ttft_p50_s:.2f} | {self.ttft_p95_s:.2f} | {self.ttft_p99_s:.2f} |"
        )


MARKDOWN_HEADER = (
    "| clients | requests | errors | req/s | tok/s | latency p50 s | p99 s | TTFT p50 s | p95 s "
    "| p99 s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least 1
    return ordered[int(rank) - 1]


def run_load(
    base_url: str,
    model: str,
    clients: int = 4,
    requests: int = 32,
    duration_s: float = MAX_DURATION_S,
    max_tokens: int = 64,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    system: str | None = None,
) -> LoadReport:
    """Run the load; every request is a streamed chat completion at temperature 0, after
    the `system` message when one is given (the same for every request: what a prefix cache
    serves)."""
    import openai  # the dev extra's client: a load run talks to the server as users do

    if clients < 1 or requests < 1:
        raise ValueError(f"clients {clients}, requests {requests}: expected positive integers")
    deadline = time.perf_counter() + min(duration_s, MAX_DURATION_S)
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens: list[int] = []
    errors = 0

    def one_client() -> None:
        nonlocal issued, errors
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        while True:
            with lock:
                if issued >= requests or time.perf_counter() > deadline:
                    return
                i = issued
                issued += 1
            t0, first, used = time.perf_counter(), None, 0
            try:
                user = {"role": "user", "content": prompts[i % len(prompts)]}
                head = [{"role": "system", "content": system}] if system else []
                for chunk in client.chat.completions.create(
                    model=model, messages=[*head, user],
                    max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                ):  # fmt: skip
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        used = chunk.usage.completion_tokens
            except openai.APIError:
                with lock:
                    errors += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                ttfts.append(first if first is not None else latencies[-1])
                tokens.append(used)

    start = time.perf_counter()
    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return LoadReport(
        clients=clients,
        requests=len(latencies),
        errors=errors,
        wall_s=wall,
        requests_per_s=len(latencies) / wall if wall > 0 else 0.0,
        tokens_per_s=sum(tokens) / wall if wall > 0 else 0.0,
        latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        ttft_p95_s=percentile(ttfts, 95),
    )
