"""Progress on long steps (export, quantization, profiling, training): one switch, one look.

The switch is off by default, so the API is silent; the CLI turns it on unless `--quiet`
(`cli.main`), `compile(progress=True)` for one call (`api.compile`). It is a context
variable: `shown(on)` sets it for a block (and the threads and tasks that block starts with
its context). A worker process inherits it through the environment: `child_env()` writes
ENV_VAR, which this module reads at import ("1" = on).

Bars are tqdm's, on stderr; `bar()` for steps that count (layers, rows, training steps),
`step()` for one long call that does not (the whole-model export), showing its elapsed time.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm import tqdm

ENV_VAR = "MIRROR_SD_PROGRESS"  # "1": a process starts with progress shown
STEP_REFRESH_S = 1.0  # how often a `step()` redraws its elapsed time

_shown: ContextVar[bool] = ContextVar("mirror_sd_progress", default=os.environ.get(ENV_VAR) == "1")


def enabled() -> bool:
    """Whether long steps show progress here (the innermost `shown()`, else ENV_VAR)."""
    return _shown.get()


def wanted(show: bool | None) -> bool:
    """A function's `progress` argument resolved: None follows the switch (`enabled()`), so
    library calls are silent unless the CLI or the caller turned progress on."""
    return enabled() if show is None else bool(show)


@contextmanager
def shown(on: bool = True) -> Iterator[None]:
    """Show (or hide, `on=False`) progress while the block runs; the previous setting after."""
    token = _shown.set(bool(on))
    try:
        yield
    finally:
        _shown.reset(token)


def bar(
    iterable_or_total: Iterable | int | None = None,
    desc: str = "",
    unit: str = "it",
    show: bool | None = None,
) -> tqdm:
    """A tqdm bar over an iterable (or counting to an int total; `.update()` it) on stderr,
    disabled unless `show` (None: `enabled()`). Use it as a context manager or iterate it."""
    off = not (enabled() if show is None else show)
    if isinstance(iterable_or_total, int):
        return tqdm(total=iterable_or_total, desc=desc, unit=unit, disable=off, file=sys.stderr)
    return tqdm(iterable_or_total, desc=desc, unit=unit, disable=off, file=sys.stderr)


@contextmanager
def step(desc: str, show: bool | None = None) -> Iterator[None]:
    """One long call as a line `desc: <elapsed>` on stderr, redrawn every STEP_REFRESH_S
    seconds while the block runs and left with the total time (when `show`, None: `enabled()`).
    """
    with bar(1, desc=desc, show=show) as b:
        b.bar_format = "{desc}: {elapsed}"
        done = threading.Event()
        ticker = threading.Thread(target=_redraw, args=(b, done), name="progress", daemon=True)
        if not b.disable:
            b.refresh()
            ticker.start()
        try:
            yield
        finally:
            done.set()
            if ticker.is_alive():
                ticker.join()
        b.update()


def _redraw(b: tqdm, done: threading.Event) -> None:
    while not done.wait(STEP_REFRESH_S):
        b.refresh()


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with ENV_VAR set to this context's switch:
    the environment of a worker process whose steps should show progress as this one's do."""
    return {**(os.environ if env is None else env), ENV_VAR: "1" if enabled() else "0"}
