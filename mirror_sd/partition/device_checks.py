"""The `devices:` section of a device map: one checked `DeviceSpec` per alias.

`parse_devices` builds a TorchSpec, OrtSpec or SimSpec from each entry, checking every
option against the schema (`device_map`) and raising a `DeviceMapError` that names the
key path (`devices.npu.providers[0]`) and what would be valid, with a guess for typos.
`check_keys` and `kind` serve the rest of the map too (`device_map_load`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from mirror_sd.partition.device_map import (
    BACKENDS,
    ORT_OPT_LEVELS,
    ORT_PROVIDERS,
    ORT_QUANTIZE,
    SPEC_CLASSES,
    TORCH_DTYPES,
    DeviceMapError,
    DeviceSpec,
    OrtSpec,
    SimSpec,
    TorchSpec,
)

SCALARS = (str, int, float, bool)  # what a YAML key or a provider option value may be
_TORCH_DEVICE = re.compile(r"^(cpu|mps|cuda|cuda:\d+)$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def kind(v: Any) -> str:
    """How an error message names a value's type: 'nothing' for None, else the type name."""
    return "nothing" if v is None else type(v).__name__


def _did_you_mean(word: Any, valid: tuple[str, ...]) -> str:
    """'did you mean X? ' for the valid word closest to `word`, or ''."""
    close = difflib.get_close_matches(str(word), valid, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def check_keys(d: Mapping, valid: tuple[str, ...], path: str, what: str) -> None:
    """Raise on the first key of `d` not in `valid`, suggesting the closest valid one."""
    for key in d:
        if key not in valid:
            at = f"{path}.{key}" if path else str(key)
            raise DeviceMapError(
                at, f"unknown key; {_did_you_mean(key, valid)}{what}: {', '.join(valid)}"
            )


def parse_devices(raw: Any) -> dict[str, DeviceSpec]:
    """The `devices:` mapping as alias -> DeviceSpec; a DeviceMapError names what is wrong."""
    if not isinstance(raw, Mapping) or not raw:
        got = "an empty mapping" if isinstance(raw, Mapping) else kind(raw)
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
                f"expected a mapping with a `backend` key ({', '.join(BACKENDS)}), got {kind(body)}",
            )
        backend = body.get("backend")
        if backend not in SPEC_CLASSES:
            what = "missing" if backend is None else f"unknown backend {backend!r}"
            raise DeviceMapError(
                f"{path}.backend", f"{what}; valid backends: {', '.join(BACKENDS)}"
            )
        valid = ("backend", *(f.name for f in fields(SPEC_CLASSES[backend]) if f.name != "alias"))
        check_keys(body, valid, path, f"valid keys for {backend} devices")
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


# torch's weight-only kernels (graphs/quantize.py); int8-rows / int7-rows are ONNX Runtime graph
# formats
TORCH_QUANTIZE = tuple(q for q in ORT_QUANTIZE if not q.endswith("-rows"))


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
    quantize = _choice(o, "quantize", TorchSpec.quantize, TORCH_QUANTIZE, path)
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
        prefill_quantize=_choice(
            o, "prefill_quantize", OrtSpec.prefill_quantize, ORT_QUANTIZE, path
        ),  # fmt: skip
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
                f"provider options must be a mapping option -> value, got {kind(opts)}",
            )
        for k, v in opts.items():
            if not isinstance(k, str) or not isinstance(v, SCALARS):
                raise DeviceMapError(
                    f"{at}.{name}.{k}",
                    f"an option value is a string, number or boolean, got {kind(v)}",
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
