"""Running the app on uvicorn: `serve()` blocks (the CLI), `ServerThread` runs it on a thread
(tests, or a Python program that serves a plan it compiled).

Both take one plan (served as `config.model_name`) or several targets as {model id: plan},
each on an engine of its own (docs/serving.md, *Several targets, one draft*).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import uvicorn

from mirror_sd.serve.app import Routes, Served
from mirror_sd.serve.batch_engine import BatchEngine
from mirror_sd.serve.config import ServeConfig, check_model_names
from mirror_sd.serve.engine import SerialEngine
from mirror_sd.serve.metrics import ServeMetrics

log = logging.getLogger("mirror_sd.serve")
LOG_LEVEL = "info"
STARTUP_TIMEOUT_S = 60.0  # ServerThread waits this long for uvicorn to listen
STARTUP_POLL_S = 0.05


Plans = Any  # a Plan, or {model id: Plan} (several targets)


def build(plans: Plans, config: ServeConfig) -> Routes:
    """The routes over one engine per target (`BatchEngine` or `SerialEngine`, as configured)
    that owns its plan, with metrics bound to it; generations keep the prefix cache on or
    off as `config` says (a setting of the engine's calls: the plans are left as they were).

    Raises:
        ValueError: an empty mapping, or a model id that is empty or given twice.
    """
    by_name = dict(plans) if isinstance(plans, Mapping) else {config.model_name: plans}
    check_model_names(list(by_name))
    served = {}
    for name, plan in by_name.items():
        metrics = ServeMetrics()
        kind = BatchEngine if config.engine == "batch" and _batches(plan) else SerialEngine
        engine = kind(plan, config.max_queue, observer=metrics, prefix_cache=config.prefix_cache)
        metrics.bind_engine(engine)
        served[name] = Served(engine, metrics)
    return Routes(served, config)


def _close(routes: Routes) -> None:
    for served in routes.served.values():
        served.engine.close()


def _batches(plan) -> bool:
    """Whether the plan's settings run in a batch session (every plan compile() makes does;
    a hand-built one may not, e.g. mode 'auto' unresolved); if not, the server falls back to
    the serial engine and says why."""
    try:
        plan.batch_session()  # checks the plan's settings; takes nothing until entered
    except ValueError as exc:
        log.warning("continuous batching is off for this plan (%s); serving serially", exc)
        return False
    return True


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one); OSError says when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror}); "
            "pick another --port, or 0 for a free one"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn(routes: Routes, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(routes.app(), log_level=log_level, lifespan="off", access_log=False)
    return uvicorn.Server(config)


def serve(
    plans: Plans,
    config: ServeConfig,
    sock: socket.socket | None = None,
    on_ready=print,
    log_level: str = LOG_LEVEL,
) -> None:
    """Serve `plans` (a plan, or {model id: plan}) until SIGINT / SIGTERM on `sock` (default:
    `listen(config.host, config.port)`; the CLI listens before it compiles, so a taken port
    fails at once); `on_ready` gets a line with the base URL once listening."""
    routes = build(plans, config)
    sock = sock or listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    names = ", ".join(repr(name) for name in routes.served)
    engines = " / ".join(sorted({served.engine.name for served in routes.served.values()}))
    on_ready(f"serving {names} at http://{_url_host(host)}:{port}/v1 (metrics at /metrics, "
             f"{engines} engine, queue of {config.max_queue} each)")  # fmt: skip
    previous = _sigterm_interrupts()
    try:
        _uvicorn(routes, log_level).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised SIGINT / SIGTERM
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _close(routes)
        sock.close()


def _sigterm_interrupts():
    """Make SIGTERM raise KeyboardInterrupt like SIGINT (uvicorn re-raises the signal after its
    graceful shutdown; the default SIGTERM action would skip closing the plan). Returns the
    previous handler, or None off the main thread (where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


class ServerThread:
    """The server on a background thread: `start()` returns once it listens; `stop()` ends it.

    `url` is the OpenAI base URL (`http://host:port/v1`); `routes` exposes the engines and
    the metrics to tests (`engine`: the first target's).
    """

    def __init__(self, plans: Plans, config: ServeConfig, log_level: str = "warning"):
        self.routes = build(plans, config)
        self.engine = self.routes.engine
        self._sock = listen(config.host, config.port)
        host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{_url_host(host)}:{self.port}/v1"
        self._server = _uvicorn(self.routes, log_level)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]},
            name="mirror-sd-serve-http", daemon=True,
        )  # fmt: skip

    def start(self) -> ServerThread:
        self._thread.start()
        for _ in range(int(STARTUP_TIMEOUT_S / STARTUP_POLL_S)):
            if self._server.started:
                return self
            if not self._thread.is_alive():
                break
            time.sleep(STARTUP_POLL_S)
        raise RuntimeError(f"the server on {self.url} did not start; see its log")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()
        _close(self.routes)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
