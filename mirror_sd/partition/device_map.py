"""YAML device maps (schema version 1): which devices exist and which graph nodes go where.

A device map is a closed, versioned schema loaded into frozen dataclasses:

    version: 1
    devices:     alias -> {backend: torch | onnxruntime | sim, ...backend options}
    placement:   node name or dotted prefix -> alias   (longest prefix wins; see placement.py)
    speculation: SpecConfig fields                      (defaults live only in SpecConfig)

Every error is a `DeviceMapError` naming the offending key path (`devices.npu.providers[0]`)
and what would be valid. Whether a provider is *available* on this machine is the devices
layer's question; this module never imports onnxruntime or any device API.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mirror_sd.partition.spec_config import SpecConfig

SCHEMA_VERSION = 1
TOP_LEVEL_KEYS = ("version", "devices", "placement", "speculation")
BACKENDS = ("torch", "onnxruntime", "sim")
TORCH_DTYPES = ("float32", "float16", "bfloat16", "auto")  # auto: partition/precision.py
ORT_PROVIDERS = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "OpenVINOExecutionProvider",
    "QNNExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
)
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
ORT_QUANTIZE = ("none", "int8", "int4", "auto")  # auto: partition/precision.py (torch too)
_TORCH_DEVICE = re.compile(r"^(cpu|mps|cuda|cuda:\d+)$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_NODE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_LAYER_RANGE = re.compile(
    r"^(?P<prefix>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*)\.\[(?P<a>\d+)-(?P<b>\d+)\)$"
)
_SCALAR = (str, int, float, bool)


class DeviceMapError(ValueError):
    """A malformed device map: `path` is the offending key path, `source` the file (or '<text>')."""

    def __init__(self, path: str, message: str, source: str = "<dict>"):
        self.path, self.message, self.source = path, message, source
        where = "" if source.startswith("<") else f" {source}"
        at = f"{path}: " if path else ""
        super().__init__(f"device map{where}: {at}{message}")


@dataclass(frozen=True)
class DeviceSpec:
    """One device of the map; `alias` is its name in `devices:`. Subclasses add options.

    `physical` names the hardware whose cores and memory the device computes on; devices with
    the same name share it (the thread budget, partition/threads.py). None derives it: "cpu"
    for the host CPU (torch cpu, ORT's CPU provider, OpenVINO on CPU), "cuda:N", else the alias.
    """

    backend: ClassVar[str] = ""
    alias: str

    def to_dict(self) -> dict[str, Any]:
        """Every option, defaults included, as the YAML mapping under `devices.<alias>`."""
        return {"backend": self.backend, **{k: v for k, v in asdict(self).items() if k != "alias"}}


@dataclass(frozen=True)
class TorchSpec(DeviceSpec):
    """A torch device: `device` is cpu | cuda | cuda:N | mps; `threads` sets torch's CPU threads."""

    backend: ClassVar[str] = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # None: the thread budget decides (all cores when alone)
    physical: str | None = None
    tensor_parallel: int = 1  # ranks of a Megatron-style TP model (mirror_sd/distributed)
    tp_timeout_s: float = 60.0  # a collective slower than this ends generation (dead rank)
    quantize: str = "none"  # int8 | int4: weight-only linears on torch's CPU kernels (auto)


@dataclass(frozen=True)
class OrtSpec(DeviceSpec):
    """An ONNX Runtime session: execution providers in priority order, as ORT takes them.

    `allow_fallback=False` asks the devices layer to fail when a listed provider is not
    available instead of silently running on the next one; `quantize="int8"` / `"int4"` exports
    the model on this device with 8- / 4-bit weights: a draft's acceptance rate changes, never
    the output; a quantized target is the plan's reference (lossless = identical to that
    quantized target's own greedy decoding). `intra_op_threads` None lets the thread budget
    decide (every core of the physical device whenever the other pipeline is idle).
    """

    backend: ClassVar[str] = "onnxruntime"
    providers: tuple[tuple[str, dict[str, Any]], ...] = (("CPUExecutionProvider", {}),)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    optimization_level: str = "all"
    allow_fallback: bool = False
    quantize: str = "none"
    physical: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["providers"] = [{name: dict(opts)} for name, opts in self.providers]
        return d


@dataclass(frozen=True)
class SimSpec(DeviceSpec):
    """Simulated hardware: no compute, timings from a cost `profile` JSON file (cost_model.Profile).

    A relative `profile` path is relative to the device map file's folder (`DeviceMap.resolve`).
    """

    backend: ClassVar[str] = "sim"
    profile: str


SPEC_CLASSES: dict[str, type[DeviceSpec]] = {c.backend: c for c in (TorchSpec, OrtSpec, SimSpec)}


@dataclass(frozen=True)
class DeviceMap:
    """A validated device map. Treat the mappings as read-only; `source` is not compared."""

    devices: Mapping[str, DeviceSpec]
    placement: Mapping[str, str]
    speculation: SpecConfig = field(default_factory=SpecConfig)
    source: str = field(default="<dict>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The fully expanded map (every default written out); `load_device_map` reads it back equal."""
        return {
            "version": SCHEMA_VERSION,
            "devices": {alias: spec.to_dict() for alias, spec in self.devices.items()},
            "placement": dict(self.placement),
            "speculation": asdict(self.speculation),
        }

    def to_yaml(self) -> str:
        """`to_dict()` as YAML text, keys in schema order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def dump(self, path: str | Path) -> None:
        """Write `to_yaml()` to `path`."""
        Path(path).write_text(self.to_yaml())

    def resolve(self, relative: str) -> Path:
        """A path from the map (e.g. a sim profile) resolved against the map file's folder."""
        p = Path(relative).expanduser()
        if p.is_absolute() or self.source.startswith("<"):
            return p
        return Path(self.source).parent / p


def load_device_map(src: str | Path | Mapping[str, Any]) -> DeviceMap:
    """Load and validate a device map.

    Args:
        src: a mapping (already parsed), a `Path` or path string to a YAML file (a string
            without a newline that names an existing file or ends in .yaml/.yml), or YAML text.
    Returns:
        The validated `DeviceMap`.
    Raises:
        DeviceMapError: the map is malformed; the message names the key path and valid choices.
        FileNotFoundError: `src` names a .yaml/.yml file that does not exist.
    """
    source = "<dict>"
    try:
        if not isinstance(src, (str, Path)):
            return _from_dict(src, source)  # a parsed mapping (anything else is rejected)
        text, source = _read(src)
        return _from_dict(_parse_yaml(text), source)
    except DeviceMapError as e:
        raise DeviceMapError(e.path, e.message, source) from None


def _read(src: str | Path) -> tuple[str, str]:
    """(text, source name) for a path or YAML text."""
    if isinstance(src, Path) or (
        "\n" not in src and (src.endswith((".yaml", ".yml")) or Path(src).is_file())
    ):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"device map file not found: {path}")
        return path.read_text(), str(path)
    return src, "<text>"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, _SCALAR) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        if isinstance(key, _SCALAR):
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str) -> Any:
    """YAML text -> Python data; syntax errors become a DeviceMapError with line and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no tags run
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DeviceMapError("", f"YAML syntax error{at}: {problem}") from None


def _from_dict(data: Any, source: str) -> DeviceMap:
    if not isinstance(data, Mapping):
        raise DeviceMapError(
            "", f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {_kind(data)}"
        )
    _check_keys(data, TOP_LEVEL_KEYS, "", "valid top-level keys")
    version = data.get("version")
    if "version" not in data:
        raise DeviceMapError(
            "version", f"missing; write `version: {SCHEMA_VERSION}` at the top of the map"
        )
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise DeviceMapError(
            "version",
            f"{version!r} is not supported; this mirror-sd reads version {SCHEMA_VERSION}",
        )
    devices = _devices(data.get("devices"))
    placement = _placement(data.get("placement"), devices)
    return DeviceMap(devices, placement, _speculation(data.get("speculation")), source)


def _kind(v: Any) -> str:
    return "nothing" if v is None else type(v).__name__


def _did_you_mean(word: Any, valid: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(word), valid, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _check_keys(d: Mapping, valid: tuple[str, ...], path: str, what: str) -> None:
    """Raise on the first key of `d` not in `valid`, suggesting the closest valid one."""
    for key in d:
        if key not in valid:
            at = f"{path}.{key}" if path else str(key)
            raise DeviceMapError(
                at, f"unknown key; {_did_you_mean(key, valid)}{what}: {', '.join(valid)}"
            )


def _devices(raw: Any) -> dict[str, DeviceSpec]:
    if not isinstance(raw, Mapping) or not raw:
        got = "an empty mapping" if isinstance(raw, Mapping) else _kind(raw)
        raise DeviceMapError(
            "devices",
            f"must be a non-empty mapping alias -> {{backend: {' | '.join(BACKENDS)}, ...}}, got {got}",
        )
    out: dict[str, DeviceSpec] = {}
    for alias, body in raw.items():
        path = f"devices.{alias}"
        if not isinstance(alias, str) or not _ALIAS.match(alias):
            raise DeviceMapError(
                path, "a device alias is letters, digits, '_' or '-', starting with a letter"
            )
        if not isinstance(body, Mapping):
            raise DeviceMapError(
                path,
                f"expected a mapping with a `backend` key ({', '.join(BACKENDS)}), got {_kind(body)}",
            )
        backend = body.get("backend")
        if backend not in SPEC_CLASSES:
            what = "missing" if backend is None else f"unknown backend {backend!r}"
            raise DeviceMapError(
                f"{path}.backend", f"{what}; valid backends: {', '.join(BACKENDS)}"
            )
        valid = ("backend", *(f.name for f in fields(SPEC_CLASSES[backend]) if f.name != "alias"))
        _check_keys(body, valid, path, f"valid keys for {backend} devices")
        opts = {k: v for k, v in body.items() if k != "backend"}
        out[alias] = _BUILDERS[backend](alias, opts, path)
    return out


def _opt_int(o: dict, key: str, path: str) -> int | None:
    v = o.get(key)
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise DeviceMapError(f"{path}.{key}", f"must be a positive integer or null, got {v!r}")


def _choice(o: dict, key: str, default: str, valid: tuple[str, ...], path: str) -> str:
    v = o.get(key, default)
    if isinstance(v, str) and v in valid:
        return v
    raise DeviceMapError(
        f"{path}.{key}", f"unknown value {v!r}; {_did_you_mean(v, valid)}valid: {', '.join(valid)}"
    )


def _torch(alias: str, o: dict, path: str) -> TorchSpec:
    device = o.get("device", TorchSpec.device)
    if not isinstance(device, str) or not _TORCH_DEVICE.match(device):
        raise DeviceMapError(
            f"{path}.device",
            f"{device!r} is not a torch device; valid: cpu, cuda, cuda:N (N = 0, 1, ...), mps",
        )
    dtype = _choice(o, "dtype", TorchSpec.dtype, TORCH_DTYPES, path)
    tp = o.get("tensor_parallel", TorchSpec.tensor_parallel)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise DeviceMapError(
            f"{path}.tensor_parallel", f"must be a positive integer (ranks), got {tp!r}"
        )
    timeout = o.get("tp_timeout_s", TorchSpec.tp_timeout_s)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise DeviceMapError(
            f"{path}.tp_timeout_s", f"must be a number of seconds > 0, got {timeout!r}"
        )
    quantize = _choice(o, "quantize", TorchSpec.quantize, ORT_QUANTIZE, path)
    if quantize not in ("none", "auto") and device != "cpu":
        raise DeviceMapError(f"{path}.quantize", f"{quantize} weights run torch's CPU kernels; "
                             "use device: cpu, or an onnxruntime device for this model")  # fmt: skip
    return TorchSpec(alias, device, dtype, _opt_int(o, "threads", path),
                     _opt_name(o, "physical", path), tp, float(timeout), quantize)  # fmt: skip


def _ort(alias: str, o: dict, path: str) -> OrtSpec:
    providers = (
        _providers(o["providers"], f"{path}.providers") if "providers" in o else OrtSpec.providers
    )
    fallback = o.get("allow_fallback", OrtSpec.allow_fallback)
    if not isinstance(fallback, bool):
        raise DeviceMapError(f"{path}.allow_fallback", f"must be true or false, got {fallback!r}")
    return OrtSpec(
        alias,
        providers,
        intra_op_threads=_opt_int(o, "intra_op_threads", path),
        inter_op_threads=_opt_int(o, "inter_op_threads", path),
        optimization_level=_choice(
            o, "optimization_level", OrtSpec.optimization_level, ORT_OPT_LEVELS, path
        ),
        allow_fallback=fallback,
        quantize=_choice(o, "quantize", OrtSpec.quantize, ORT_QUANTIZE, path),
        physical=_opt_name(o, "physical", path),
    )


def _opt_name(o: dict, key: str, path: str) -> str | None:
    v = o.get(key)
    if v is None or (isinstance(v, str) and _ALIAS.match(v.replace(":", "_"))):
        return v
    raise DeviceMapError(
        f"{path}.{key}",
        f"must be a name like cpu, cuda:0 or npu0 (devices with the same name share it), got {v!r}",
    )


def _sim(alias: str, o: dict, path: str) -> SimSpec:
    profile = o.get("profile")
    if not isinstance(profile, str) or not profile:
        raise DeviceMapError(
            f"{path}.profile", f"required: the path of a cost profile JSON file, got {profile!r}"
        )
    return SimSpec(alias, profile)


_BUILDERS = {"torch": _torch, "onnxruntime": _ort, "sim": _sim}


def _providers(raw: Any, path: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Parse `- Name: {options}` / `- Name` entries into ((name, options), ...)."""
    if not isinstance(raw, list) or not raw:
        raise DeviceMapError(
            path, "must be a non-empty list like `- CPUExecutionProvider: {}`, in priority order"
        )
    out: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(raw):
        at = f"{path}[{i}]"
        if isinstance(entry, str):
            name, opts = entry, {}
        elif isinstance(entry, Mapping) and len(entry) == 1:
            name, opts = next(iter(entry.items()))
            opts = {} if opts is None else opts
        else:
            raise DeviceMapError(
                at, "each provider is a name or a one-key mapping `- Name: {option: value}`"
            )
        if name not in ORT_PROVIDERS:
            hint = _provider_hint(str(name))
            raise DeviceMapError(
                at, f"unknown execution provider {name!r}; {hint}valid: {', '.join(ORT_PROVIDERS)}"
            )
        if not isinstance(opts, Mapping):
            raise DeviceMapError(
                f"{at}.{name}",
                f"provider options must be a mapping option -> value, got {_kind(opts)}",
            )
        for k, v in opts.items():
            if not isinstance(k, str) or not isinstance(v, _SCALAR):
                raise DeviceMapError(
                    f"{at}.{name}.{k}",
                    f"an option value is a string, number or boolean, got {_kind(v)}",
                )
        if any(name == n for n, _ in out):
            raise DeviceMapError(at, f"{name} is listed twice; list each provider once")
        out.append((name, dict(opts)))
    return tuple(out)


def _provider_hint(name: str) -> str:
    """'did you mean X? ' for typos, case slips and short names like 'cuda' or 'OpenVINO'."""
    lowered = {p.lower(): p for p in ORT_PROVIDERS}
    for guess in (name.lower(), f"{name.lower()}executionprovider"):
        if guess in lowered:
            return f"did you mean {lowered[guess]!r}? "
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return f"did you mean {lowered[close[0]]!r}? " if close else ""


def _placement(raw: Any, devices: Mapping[str, DeviceSpec]) -> dict[str, str]:
    if not isinstance(raw, Mapping) or not raw:
        raise DeviceMapError(
            "placement",
            "must be a non-empty mapping node-name-or-prefix -> device alias, e.g. `target: gpu`",
        )
    out: dict[str, str] = {}
    for key, alias in raw.items():
        path = f"placement[{key}]"
        names = _expand_key(key, path)
        if alias not in devices:
            raise DeviceMapError(
                path, f"unknown device alias {alias!r}; devices defined: {', '.join(devices)}"
            )
        for name in names:
            if name in out:
                raise DeviceMapError(
                    path, f"places {name}, which another key places too; place each node once"
                )
            out[name] = alias
    return out


def _expand_key(key: Any, path: str) -> list[str]:
    """A placement key as node names / prefixes: a layer range `target.layers.[a-b)` is the
    keys `target.layers.a` .. `target.layers.<b-1>` (half-open, like Python's range)."""
    m = _LAYER_RANGE.match(key) if isinstance(key, str) else None
    if m:
        a, b = int(m["a"]), int(m["b"])
        if not a < b:
            raise DeviceMapError(
                path, f"empty layer range [{a}-{b}): write [first-end) with first < end"
            )
        return [f"{m['prefix']}.{i}" for i in range(a, b)]
    if not isinstance(key, str) or not _NODE_KEY.match(key):
        raise DeviceMapError(
            path,
            "not a node name, dotted prefix or layer range like `target`, `draft.layers`, "
            "`target.layers.3` or `target.layers.[0-14)`",
        )
    return [key]


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _speculation(raw: Any) -> SpecConfig:
    if raw is None:
        return SpecConfig()
    if not isinstance(raw, Mapping):
        raise DeviceMapError(
            "speculation", f"must be a mapping of SpecConfig fields, got {_kind(raw)}"
        )
    _check_keys(raw, SpecConfig.field_names(), "speculation", "valid keys (SpecConfig fields)")
    types = {f.name: str(f.type) for f in fields(SpecConfig)}
    values = {k: _coerce(v, types[k], f"speculation.{k}") for k, v in raw.items()}
    try:
        return SpecConfig(**values)
    except (TypeError, ValueError) as e:
        msg = str(e)
        path = msg.split(" ", 1)[0] if msg.startswith("speculation") else "speculation"
        raise DeviceMapError(path.rstrip(":"), msg.removeprefix(path).lstrip(": ")) from None


def _coerce(v: Any, type_str: str, path: str) -> Any:
    """Check a speculation value against its SpecConfig annotation ('int | str', 'float', ...).

    Ints are accepted where floats are expected (and converted); booleans never count as ints.
    """
    allowed = [t.strip() for t in type_str.split("|")]
    if isinstance(v, bool):
        ok = "bool" in allowed
    elif isinstance(v, int):
        ok = "int" in allowed or "float" in allowed
        v = v if "int" in allowed or not ok else float(v)
    else:
        ok = any(isinstance(v, {"float": float, "str": str}.get(t, ())) for t in allowed)
    if not ok:
        expected = " or ".join(_TYPE_WORDS.get(t, t) for t in allowed)
        raise DeviceMapError(path, f"expected {expected}, got {v!r}")
    return v
