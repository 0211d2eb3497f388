"""The ONNX Runtime core of the devices layer: the device and its sessions.

    OrtDevice        the device map's `backend: onnxruntime` entry: providers (checked against
                     this onnxruntime build), session options, sessions
    SessionPool      one graph's sessions, one per intra-op thread count (the thread budget
                     switches between them); all of them share one copy of the weights

What every ORT runner needs besides lives next to it: the KV buffers bound in place and
their length pointer in `ort_kv` (`HostKV`, `DeviceKV`, `bind_kv`, `RowCache`), and which
provider really runs which node in `ort_placement` (`node_placement`, `placement_summary`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from mirror_sd.backends.facts import HOST_CPU, provider_physical
from mirror_sd.devices.ort_placement import RECORD_ASSIGNMENT, records_assignment_api
from mirror_sd.graphs.export import cached_entry
from mirror_sd.partition.device_map import ORT_PROVIDERS

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
SPINNING = "session.intra_op.allow_spinning"
SPIN_STOP = "session.force_spinning_stop"  # pool threads stop spinning when a run returns
SAVE_PREPACKED = "session.save_external_prepacked_constant_initializers"


class ProviderUnavailableError(RuntimeError):
    """A requested execution provider is not in this onnxruntime build."""


@dataclass(frozen=True)
class OrtDevice:
    """ONNX Runtime session settings: providers in priority order, as ORT takes them.

    `providers` is ((name, options), ...), e.g. (("OpenVINOExecutionProvider",
    {"device_type": "NPU"}), ("CPUExecutionProvider", {})). With `allow_fallback` a provider
    missing from this onnxruntime build is dropped with a warning instead of an error.
    `intra_op_threads` is the thread count of a session made without an explicit one (None:
    ORT's default, every core). `spinning` False makes idle pool threads sleep at once
    instead of spinning. `spin_stop` keeps spinning inside a run (threads wait for the
    next operator's work without sleeping) and stops it when the run returns, so a pool does
    not spin into the other pipeline's turn: what pipelines that take turns on the same cores
    want (measured on the 2-core EPYC, a speculative round of 4 int8 0.5B draft steps and a
    5-row fp32 1.5B verification: 266 ms, against 309 ms with spinning off and 364 ms with
    ORT's default spinning; docs/runtime.md, Threads).
    """

    providers: tuple[tuple[str, dict[str, Any]], ...] = (("CPUExecutionProvider", {}),)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    optimization_level: str = "all"  # disable | basic | extended | all
    allow_fallback: bool = False
    spinning: bool = True
    spin_stop: bool = False

    def __post_init__(self) -> None:
        providers = tuple((str(n), dict(o or {})) for n, o in self.providers)
        object.__setattr__(self, "providers", providers)
        if not providers:
            raise ValueError("OrtDevice needs at least one execution provider")
        for name, _ in providers:
            if name not in ORT_PROVIDERS:
                raise ValueError(
                    f"unknown execution provider {name!r}; standard names: "
                    f"{', '.join(ORT_PROVIDERS)}"
                )
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"optimization_level {self.optimization_level!r}: expected one of "
                f"{', '.join(OPTIMIZATION_LEVELS)}"
            )

    def check(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        """The providers a session will get, in order, after checking this onnxruntime build.

        Raises:
            ProviderUnavailableError: a provider is not available and `allow_fallback` is off.
        """
        available = ort.get_available_providers()
        kept = tuple((n, o) for n, o in self.providers if n in available)
        missing = [n for n, _ in self.providers if n not in available]
        if missing and not self.allow_fallback:
            raise ProviderUnavailableError(
                f"execution provider {missing[0]} is not available in this onnxruntime "
                f"({ort.__version__}, package {ort.get_device()}); available: "
                f"{', '.join(available)}. Install the onnxruntime build that has it "
                "(onnxruntime-gpu, onnxruntime-openvino, onnxruntime-qnn, onnxruntime-directml) "
                "or set allow_fallback: true to run on the next listed provider"
            )
        for name in missing:
            warnings.warn(
                f"execution provider {name} is not available (available: "
                f"{', '.join(available)}); falling back to the next listed provider",
                RuntimeWarning,
                stacklevel=2,
            )
        return kept or (("CPUExecutionProvider", {}),)

    @property
    def on_host_cpu(self) -> bool:
        """True when the first provider computes on this machine's CPU cores."""
        return provider_physical(*self.providers[0]) == HOST_CPU

    def describe(self) -> str:
        """e.g. 'onnxruntime OpenVINOExecutionProvider{device_type=NPU} > CPUExecutionProvider'."""
        names = [name + _braced(options) for name, options in self.providers]
        threads = f", {self.intra_op_threads} thread(s)" if self.intra_op_threads else ""
        return f"onnxruntime {' > '.join(names)}{threads}"

    def session_options(
        self, record_placement: bool = True, threads: int | None = None
    ) -> ort.SessionOptions:
        """Session options for these settings; `threads` overrides `intra_op_threads`;
        `record_placement` prepares `node_placement`."""
        so = ort.SessionOptions()
        so.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization_level]
        threads = threads if threads is not None else self.intra_op_threads
        if threads is not None:
            so.intra_op_num_threads = threads
        if self.inter_op_threads is not None:
            so.inter_op_num_threads = self.inter_op_threads
        if not self.spinning:
            so.add_session_config_entry(SPINNING, "0")
        elif self.spin_stop:
            so.add_session_config_entry(SPINNING, "1")
            so.add_session_config_entry(SPIN_STOP, "1")
        so.log_severity_level = 3  # errors only: ORT's placement notes come via node_placement
        if record_placement and records_assignment_api():
            so.add_session_config_entry(RECORD_ASSIGNMENT, "1")
        elif record_placement:  # older ORT: learn the placement from a profile of the first run
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "mirror_sd_ort_profile")
        return so

    def session(
        self, path: str | Path, record_placement: bool = True, threads: int | None = None
    ) -> ort.InferenceSession:
        """An InferenceSession for the model at `path` on the checked providers."""
        providers = self.check()
        return ort.InferenceSession(
            str(path),
            self.session_options(record_placement, threads),
            providers=[n for n, _ in providers],
            provider_options=[{k: str(v) for k, v in o.items()} for _, o in providers],
        )


class SessionPool:
    """The sessions of one exported graph, one per intra-op thread count; `session` is the one
    selected by `set_threads` (the thread budget of `partition.threads`).

    A pool that only ever uses one thread count holds one ordinary session. A second count
    on the CPU provider must not copy the weights again: the pool then writes (once, cached
    beside the graph) an optimized copy whose initializers and their pre-packed CPU-kernel
    forms live in one external file (ORT's `session.save_external_prepacked_constant_
    initializers`) and rebuilds its sessions from it. Each session memory-maps that file, so
    every thread count reads the same pages: one copy of the weights in memory.
    Other providers get a session of the original graph per count.
    """

    def __init__(self, device: OrtDevice, path: str | Path, threads: int | None = None):
        self.device, self.path = device, Path(path)
        self._threads = threads if threads is not None else device.intra_op_threads
        self._sessions: dict[int | None, ort.InferenceSession] = {}
        self._shared = False
        self._lock = threading.Lock()
        self._sessions[self._threads] = device.session(self.path, threads=self._threads)

    @property
    def threads(self) -> int | None:
        return self._threads

    @property
    def session(self) -> ort.InferenceSession:
        return self._sessions[self._threads]

    def set_threads(self, threads: int | None) -> None:
        """Run on `threads` intra-op threads from now on (builds that session once)."""
        self.session_for(threads)
        self._threads = threads

    def session_for(self, threads: int | None) -> ort.InferenceSession:
        """The session of `threads` intra-op threads, built once (the selection is unchanged:
        several runners can read one pool, each at its own count; `shared_sessions`)."""
        with self._lock:
            if threads not in self._sessions:
                if self.device.on_host_cpu and not self._shared:
                    self._share_weights()
                self._sessions[threads] = self.device.session(self._source(), threads=threads)
            return self._sessions[threads]

    @property
    def thread_counts(self) -> tuple[int | None, ...]:
        """The thread counts this pool has a session for."""
        return tuple(self._sessions)

    def _source(self) -> Path:
        return prepacked_copy(self.path, self.device) if self._shared else self.path

    def _share_weights(self) -> None:
        """Rebuild the existing sessions from the pre-packed copy (one mapped weights file)."""
        self._shared = True
        src = self._source()
        for threads in list(self._sessions):
            self._sessions[threads] = self.device.session(src, threads=threads)


def prepacked_copy(path: str | Path, device: OrtDevice) -> Path:
    """`path`'s graph optimized for this CPU and onnxruntime, initializers and their pre-packed
    forms in one external file, written once into `<graph folder>/prepacked-[<stem>-]<tag>/`.

    The tag covers the onnxruntime version, the CPU (its model name and flags: pre-packed
    layouts are kernel-specific) and the optimization level.
    """
    path = Path(path)
    stem = "" if path.stem == "model" else f"{path.stem}-"  # graphs sharing a folder
    entry = path.parent / f"prepacked-{stem}{_hardware_tag(device)}"

    def write(tmp: Path) -> None:
        so = device.session_options(record_placement=False, threads=1)
        so.optimized_model_filepath = str(tmp / "model.onnx")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "model.onnx.data"
        )
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        so.add_session_config_entry(SAVE_PREPACKED, "1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    return cached_entry(entry, write)


def _hardware_tag(device: OrtDevice) -> str:
    cpu = ""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        lines = info.read_text().splitlines()
        cpu = "|".join(x for x in lines if x.startswith(("model name", "flags")))[:4096]
    key = json.dumps([ort.__version__, cpu, device.optimization_level])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _braced(options: dict[str, Any]) -> str:
    """{'device_type': 'NPU'} -> '{device_type=NPU}'; {} -> ''."""
    return "{" + ", ".join(f"{k}={v}" for k, v in options.items()) + "}" if options else ""
