"""Pipelines: one worker thread per device, the only concurrency in the runtime.

`Pipeline.submit(node, fn, ...)` runs fn on the device's worker and records a trace
slice named by the graph node. ORT's `run` and torch kernels release the GIL, so the
two workers overlap for real.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mirror_sd.runtime.tracing import Tracer


class Pipeline:
    def __init__(self, device: str, name: str, init: Callable[[], None] | None = None):
        self.device = device  # device alias, e.g. "npu"
        self.name = name  # pipeline name, e.g. "draft streaming"
        self.pool = ThreadPoolExecutor(
            1, thread_name_prefix=f"mirror-sd-{device}", initializer=init
        )
        self.busy_s = 0.0

    def submit(self, tracer: Tracer, node: str, fn: Callable[..., Any], *args, **kwargs) -> Future:
        """Run fn(*args, **kwargs) on this pipeline's worker; the slice lands in `tracer`.

        Once done, the future's `span` attribute holds the run's (start, end) in tracer time.
        """

        fut: Future = Future()

        def task() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            start = tracer.now()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the waiting scheduler, never swallowed
                self._finish(fut, tracer, node, start)
                fut.set_exception(exc)
            else:
                self._finish(fut, tracer, node, start)
                fut.set_result(result)

        self.pool.submit(task)
        return fut

    def _finish(self, fut: Future, tracer: Tracer, node: str, start: float) -> None:
        end = tracer.now()
        fut.span = (start, end)
        self.busy_s += end - start
        tracer.slice(self.device, self.name, node, start, end)

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)
