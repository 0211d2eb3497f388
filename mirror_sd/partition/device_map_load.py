"""Loading a YAML device map (schema version 1, `device_map`) into a checked `DeviceMap`.

`load_device_map` reads a file, YAML text or a parsed mapping and checks the top level,
`placement` (node names, dotted prefixes, layer ranges `target.layers.[0-14)`) and
`speculation` (SpecConfig fields and their types) here; each `devices:` entry is checked by
`device_checks`. Every error is a `DeviceMapError` naming the offending key path and what
would be valid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from mirror_sd.partition.device_checks import SCALARS, check_keys, kind, parse_devices
from mirror_sd.partition.device_map import (
    SCHEMA_VERSION,
    TOP_LEVEL_KEYS,
    DeviceMap,
    DeviceMapError,
    DeviceSpec,
)
from mirror_sd.partition.spec_config import SpecConfig

_NODE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_LAYER_RANGE = re.compile(
    r"^(?P<prefix>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*)\.\[(?P<a>\d+)-(?P<b>\d+)\)$"
)


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
        if isinstance(key, SCALARS) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        if isinstance(key, SCALARS):
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
            "", f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {kind(data)}"
        )
    check_keys(data, TOP_LEVEL_KEYS, "", "valid top-level keys")
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
    devices = parse_devices(data.get("devices"))
    placement = _placement(data.get("placement"), devices)
    return DeviceMap(devices, placement, _speculation(data.get("speculation")), source)


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


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "tuple[int, ...]": "a list of integers"}  # fmt: skip


def _speculation(raw: Any) -> SpecConfig:
    if raw is None:
        return SpecConfig()
    if not isinstance(raw, Mapping):
        raise DeviceMapError(
            "speculation", f"must be a mapping of SpecConfig fields, got {kind(raw)}"
        )
    check_keys(raw, SpecConfig.field_names(), "speculation", "valid keys (SpecConfig fields)")
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
    elif isinstance(v, list | tuple):  # SpecConfig checks the items
        ok, v = "tuple[int, ...]" in allowed, tuple(v)
    else:
        ok = any(isinstance(v, {"float": float, "str": str}.get(t, ())) for t in allowed)
    if not ok:
        expected = " or ".join(_TYPE_WORDS.get(t, t) for t in allowed)
        raise DeviceMapError(path, f"expected {expected}, got {v!r}")
    return v
