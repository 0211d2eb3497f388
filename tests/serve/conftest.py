"""Serve fixtures: a tiny compiled plan, servers on a free loopback port, the openai client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mirror_sd.api as api
from mirror_sd.devices.shared_sessions import shared_sessions
from mirror_sd.serve.config import ServeConfig
from mirror_sd.serve.server import ServerThread
from tests.conftest import TORCH_DRAFT_MAP, tiny_pair

MODEL = "tiny"
WAIT_S = 60.0  # liveness bound of `wait_for` (a hung server fails the test, nothing is timed)


@pytest.fixture(scope="package")
def plan(tmp_path_factory):
    """A mirror-mode plan over a 6-layer tiny Qwen2 target and a 2-layer draft (torch, CPU)."""
    target, draft, _ = tiny_pair(tmp_path_factory.mktemp("serve-models"))
    with api.compile(
        target, draft, TORCH_DRAFT_MAP, exit_layer=3, branch_budget=4, max_len=256
    ) as p:
        yield p


@contextmanager
def running(plan, **config) -> Iterator[ServerThread]:
    """A server for `plan` on 127.0.0.1 and a free port (the default engine unless `engine=`
    says otherwise), stopped afterwards."""
    with ServerThread(plan, ServeConfig(MODEL, port=0, **config)) as server:
        yield server


@pytest.fixture(scope="package")
def server(plan):
    """One server shared by the tests that leave the plan as they found it."""
    with running(plan) as s:
        yield s


def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def metrics(server: ServerThread) -> dict[tuple[str, tuple], float]:
    """/metrics parsed with prometheus_client's parser: (sample name, sorted labels) -> value."""
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until true; fail after WAIT_S (a liveness bound, not a timing)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class GatedPlan:
    """A real plan whose stream (serial engine) or batch session's rounds (batch engine) pause
    after each piece / round until `gate` is set: lets a test hold generations mid-way (to
    queue others behind them, or to disconnect from one)."""

    def __init__(self, plan):
        self._plan = plan
        self.gate = threading.Event()
        self.started = threading.Event()  # the held generation streamed its first piece
        self.rounds: list[set[int]] = []  # batch engine: the handles in each round, in order

    def __getattr__(self, name):
        return getattr(self._plan, name)

    def stream(self, *args, **kwargs):
        for piece in self._plan.stream(*args, **kwargs):
            self.started.set()
            yield piece
            self.gate.wait(WAIT_S)

    def batch_session(self, *args, **kwargs):
        return _GatedSession(self, self._plan.batch_session(*args, **kwargs))


class SessionProxy:
    """A plan's batch session with `rounds()` (or anything else) overridden by a subclass;
    `owner` is the test plan that made it."""

    def __init__(self, owner, session):
        self._owner, self._session = owner, session

    def __getattr__(self, name):
        return getattr(self._session, name)

    def __enter__(self):
        self._session.__enter__()
        return self

    def __exit__(self, *exc):
        return self._session.__exit__(*exc)


class _GatedSession(SessionProxy):
    @property
    def _gated(self) -> GatedPlan:
        return self._owner

    def rounds(self):
        for deltas in self._session.rounds():
            self._gated.rounds.append(set(deltas))
            self._gated.started.set()
            yield deltas  # the engine handles the boundary, then asks for the next round
            self._gated.gate.wait(WAIT_S)


@contextmanager
def loaded(folders: dict, share: bool = False) -> Iterator[tuple[dict, object]]:
    """({id: plan} of saved plan folders, the share or None): each plan loaded alone, or all
    inside `shared_sessions()` as `mirror-sd serve` loads them; closed afterwards."""
    with shared_sessions() if share else nullcontext() as sh:
        plans = {name: api.load(folder) for name, folder in folders.items()}
    try:
        yield plans, sh
    finally:
        for p in plans.values():
            p.close()


@contextmanager
def served_cli(folders: dict, cache, *flags: str) -> Iterator[tuple[openai.OpenAI, list[str]]]:
    """`mirror-sd serve` of the saved plans as a subprocess: (a client, its stderr lines up to
    the 'serving' line); SIGTERM afterwards, which must exit 0."""
    env = {**os.environ, "MIRROR_SD_CACHE": str(cache)}
    argv = [sys.executable, "-m", "mirror_sd.cli", "serve", *map(str, folders.values()),
            "--port", "0", *flags]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if m := re.search(r"serving .* at (http://127\.0\.0\.1:\d+/v1)", line):
                break
        else:
            pytest.fail(f"the server exited with {proc.wait()} before listening: {lines}")
        yield openai.OpenAI(base_url=m.group(1), api_key="unused", max_retries=0), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
