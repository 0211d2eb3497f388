"""One copy of a draft's weights for several plans in one process (#25): one ONNX Runtime
session per draft graph, one torch model per draft checkpoint.

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

A torch draft (S2D's sorted exits run one: `devices/sorted_exits.py`) is shared the same way
by `shared_model`: plans whose draft is the same checkpoint (its config and safetensors
files, by content) at the same device, dtype and weight quantization get one `CausalLM`.
Each plan's `TorchRunner` keeps its own `StaticKVCache` and thread count; a forward only
reads the module's weights, so two plans' draft workers may run it at the same time. What a
plan derives from the model (a trimmed head, stream rows, exit heads) is its own and leaves
the shared model unmodified (`with_trimmed_head`, `with_streams` copy the module tree).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from mirror_sd.devices.ort_core import OrtDevice, SessionPool

HASH_CHUNK = 1 << 24  # bytes read at a time when two graphs' contents are compared

_ACTIVE: list[SessionShare] = []  # the shares of open `shared_sessions()` blocks, innermost last
_LOCK = threading.Lock()
ORT_SESSION, TORCH_MODEL = "ONNX Runtime session", "torch model"  # what a share holds
_Files = Callable[[Path], list[Path]]  # the files holding a graph's or checkpoint's weights


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
    kind: str  # what is shared, as the server's log names it
    settings: str  # the device's settings but its default thread count
    sizes: tuple[int, ...]  # of the files that hold the weights (`_files`, `_checkpoint_files`)
    path: Path
    value: Any  # a SessionPool or a CausalLM
    views: int = 1


@dataclass
class SessionShare:
    """What one `shared_sessions()` block handed out; `shared()` reports what is shared."""

    _entries: list[_Entry] = field(default_factory=list)
    _digests: dict[Path, str] = field(default_factory=dict)

    def view(self, device: OrtDevice, path: str | Path) -> PoolView:
        """A view on the pool of the same graph on the same device settings, made if new."""
        settings = repr(dataclasses.replace(device, intra_op_threads=None))
        e = self._get(ORT_SESSION, settings, Path(path).resolve(), _files,
                      lambda: SessionPool(device, path))  # fmt: skip
        return PoolView(e.value, device.intra_op_threads)

    def model(self, folder: str | Path, settings: str, load: Callable[[], Any]) -> Any:
        """The torch model of the checkpoint in `folder` loaded with `settings` (device,
        dtype, quantization), `load()`-ed if no plan of this block has it yet."""
        return self._get(TORCH_MODEL, settings, Path(folder).resolve(), _checkpoint_files,
                         load).value  # fmt: skip

    def shared(self) -> list[tuple[str, Path, int]]:
        """(what, graph or checkpoint, runners using its one copy) for each copy more than one
        runner uses; `what` is ORT_SESSION or TORCH_MODEL."""
        return [(e.kind, e.path, e.views) for e in self._entries if e.views > 1]

    def _get(self, kind: str, settings: str, path: Path, files: _Files,
             make: Callable[[], Any]) -> _Entry:  # fmt: skip
        """The entry of the same weights (by content) and settings, else a new one of make()."""
        sizes = tuple(f.stat().st_size for f in files(path))
        for e in self._entries:
            same = (e.kind, e.settings, e.sizes) == (kind, settings, sizes)
            if same and self._same(e.path, path, files):
                e.views += 1
                return e
        self._entries.append(_Entry(kind, settings, sizes, path, make()))
        return self._entries[-1]

    def _same(self, a: Path, b: Path, files: _Files) -> bool:
        return a == b or self._digest(a, files) == self._digest(b, files)

    def _digest(self, path: Path, files: _Files) -> str:
        if path not in self._digests:
            h = hashlib.sha256()
            for f in files(path):
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


def _checkpoint_files(folder: Path) -> list[Path]:
    """A Hugging Face checkpoint's config, then its safetensors files."""
    weights = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    return [folder / "config.json", *weights]


@contextmanager
def shared_sessions() -> Iterator[SessionShare]:
    """Inside the block, ONNX Runtime runners of the same graph on the same device settings
    share one `SessionPool` (`session_pool`), and torch drafts of the same checkpoint and
    settings one model (`shared_model`); both outlive the block."""
    share = SessionShare()
    with _LOCK:
        _ACTIVE.append(share)
    try:
        yield share
    finally:
        with _LOCK:
            _ACTIVE.remove(share)


def _active() -> SessionShare | None:
    with _LOCK:
        return _ACTIVE[-1] if _ACTIVE else None


def session_pool(device: OrtDevice, path: str | Path) -> SessionPool | PoolView:
    """The sessions of the graph at `path` for a new runner: a pool of its own, or inside
    `shared_sessions()` a view on the pool every runner of the same graph shares."""
    share = _active()
    return SessionPool(device, path) if share is None else share.view(device, path)


def shared_model(folder: str | Path, settings: str, load: Callable[[], Any]) -> Any:
    """The torch model of the checkpoint in `folder` for a new runner: `load()`, or inside
    `shared_sessions()` the one model every runner of the same checkpoint and `settings`
    (device, dtype, quantization: what `load` reads the weights as) shares."""
    share = _active()
    return load() if share is None else share.model(folder, settings, load)
