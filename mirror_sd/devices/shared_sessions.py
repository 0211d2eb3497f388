"""One ONNX Runtime session per draft graph for several plans in one process (#25).

    with shared_sessions() as share:        # what `mirror-sd serve plans/a plans/b` does
        a, b = api.load("plans/a"), api.load("plans/b")
    a.draft.session is b.draft.session      # True when both drafts are the same graph

What is shared: a graph's `SessionPool` (its sessions, one per intra-op thread count, and so
the weights they hold). What is not: anything per sequence. An `OrtRunner` keeps its KV cache
in buffers of its own, bound to the graph's past_* inputs and new_* outputs by an IOBinding
made for each forward, and its own length pointer; `run_with_iobinding` is thread-safe, so the
draft workers of two plans may run the one session at the same time. Each runner also keeps
its own thread count (`PoolView`): one plan's thread budget does not switch the other's.

Two graphs are the same when their bytes are: each saved plan folder keeps its own copy of the
draft's export, so paths differ. The key is the device's settings (all but the default thread
count) and the content of the graph file and of the external-data files (`*.data`) beside it,
hashed only when two candidates have equal sizes. Outside `shared_sessions()` every runner
gets a pool of its own, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from mirror_sd.devices.ort_core import OrtDevice, SessionPool

HASH_CHUNK = 1 << 24  # bytes read at a time when two graphs' contents are compared

_ACTIVE: list[SessionShare] = []  # the shares of open `shared_sessions()` blocks, innermost last
_LOCK = threading.Lock()


class PoolView:
    """One runner's view of a shared `SessionPool`: the pool's sessions (and weights), the
    runner's own thread count. Has the pool's interface (`session`, `threads`,
    `set_threads`, `thread_counts`)."""

    def __init__(self, pool: SessionPool, threads: int | None):
        self.pool, self.path, self._threads = pool, pool.path, threads
        pool.session_for(threads)

    @property
    def session(self) -> ort.InferenceSession:
        return self.pool.session_for(self._threads)

    @property
    def threads(self) -> int | None:
        return self._threads

    def set_threads(self, threads: int | None) -> None:
        """Run this runner's next forwards on `threads` threads (others keep theirs)."""
        self.pool.session_for(threads)
        self._threads = threads

    @property
    def thread_counts(self) -> tuple[int | None, ...]:
        return self.pool.thread_counts


@dataclass
class _Entry:
    settings: str  # the device's settings but its default thread count
    sizes: tuple[int, ...]  # of the graph's files (`_files`)
    path: Path
    pool: SessionPool
    views: int = 1


@dataclass
class SessionShare:
    """The pools handed out inside one `shared_sessions()` block; `shared()` reports them."""

    _entries: list[_Entry] = field(default_factory=list)
    _digests: dict[Path, str] = field(default_factory=dict)

    def view(self, device: OrtDevice, path: str | Path) -> PoolView:
        """A view on the pool of the same graph on the same device settings, made if new."""
        path = Path(path).resolve()
        settings = repr(dataclasses.replace(device, intra_op_threads=None))
        sizes = tuple(f.stat().st_size for f in _files(path))
        for e in self._entries:
            if e.settings == settings and e.sizes == sizes and self._same(e.path, path):
                e.views += 1
                return PoolView(e.pool, device.intra_op_threads)
        pool = SessionPool(device, path)
        self._entries.append(_Entry(settings, sizes, path, pool))
        return PoolView(pool, pool.threads)

    def shared(self) -> list[tuple[Path, int]]:
        """(graph, runners using its one pool) for each graph more than one runner uses."""
        return [(e.path, e.views) for e in self._entries if e.views > 1]

    def _same(self, a: Path, b: Path) -> bool:
        return a == b or self._digest(a) == self._digest(b)

    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            h = hashlib.sha256()
            for f in _files(path):
                h.update(f.name.encode() + b"\0")
                with f.open("rb") as fh:
                    while chunk := fh.read(HASH_CHUNK):
                        h.update(chunk)
            self._digests[path] = h.hexdigest()
        return self._digests[path]


def _files(path: Path) -> list[Path]:
    """The graph file, then the external-data files beside it (`model.onnx.data`, ...)."""
    data = sorted(f for f in path.parent.glob("*.data") if f.is_file())
    return [path, *data]


@contextmanager
def shared_sessions() -> Iterator[SessionShare]:
    """Inside the block, ONNX Runtime runners of the same graph on the same device settings
    share one `SessionPool` (`session_pool`); the sessions outlive the block."""
    share = SessionShare()
    with _LOCK:
        _ACTIVE.append(share)
    try:
        yield share
    finally:
        with _LOCK:
            _ACTIVE.remove(share)


def session_pool(device: OrtDevice, path: str | Path) -> SessionPool | PoolView:
    """The sessions of the graph at `path` for a new runner: a pool of its own, or inside
    `shared_sessions()` a view on the pool every runner of the same graph shares."""
    with _LOCK:
        share = _ACTIVE[-1] if _ACTIVE else None
    return SessionPool(device, path) if share is None else share.view(device, path)
