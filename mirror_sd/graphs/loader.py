"""Load a local Hugging Face model folder (config.json + safetensors + tokenizer) into `CausalLM`.

`MODULE_TREES` maps each family's `modules` (`families.FAMILIES`) to the `CausalLM` class
that runs it and the conversion its checkpoint's state dict needs, if any.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mirror_sd.graphs import phi3
from mirror_sd.graphs.config import ModelConfig, load_config
from mirror_sd.graphs.families import FAMILIES
from mirror_sd.graphs.gemma import Gemma3CausalLM
from mirror_sd.graphs.model import CausalLM

StateConversion = Callable[[ModelConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
# families.Family.modules -> (the CausalLM class, the state dict's conversion or None)
MODULE_TREES: dict[str, tuple[type[CausalLM], StateConversion | None]] = {
    "llama": (CausalLM, None),
    "gemma3": (Gemma3CausalLM, None),
    "phi3": (phi3.Phi3CausalLM, phi3.unfuse),
}


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    """The `CausalLM` class that runs `cfg`'s family."""
    return MODULE_TREES[FAMILIES[cfg.model_type].modules][0]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights; save the model with "
            "`save_pretrained(..., safe_serialization=True)`"
        )
    return files


def load_state_dict(
    folder: Path, dtype: torch.dtype | None = None, skip: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """The folder's weights by name, each converted to `dtype` as it is read (one tensor at a
    time: a bf16 checkpoint loaded as fp32 never holds both copies), `skip` names left out."""
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        with safe_open(f, framework="pt") as weights:
            for k in weights.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if k not in skip:
                    t = weights.get_tensor(k)
                    state[k] = t if dtype is None else t.to(dtype)
    return state


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> CausalLM:
    """Instantiate `CausalLM` without random init and load an HF-named state dict into it.

    Raises:
        KeyError: the checkpoint lacks weights the architecture needs, or has unknown ones.
    """
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    convert = MODULE_TREES[FAMILIES[cfg.model_type].modules][1]
    state = {k: v.to(dtype) for k, v in (convert(cfg, state) if convert else state).items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {
        k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    }
    missing, unexpected = expected - state.keys(), state.keys() - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not match the {cfg.model_type} architecture: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if model.inv_freq.is_meta:  # Llama's tree computes it under the meta device; others do not
        model.inv_freq = cfg.rope_inv_freq()[0]
    return model.eval()


def load_model(folder: str | Path, dtype: str | torch.dtype = "float32") -> CausalLM:
    """Load the model in a local HF folder as a stage-addressable `CausalLM` (eval mode).

    Raises:
        FileNotFoundError: no config.json or no safetensors weights in `folder`.
        UnsupportedModelError: the architecture is not one of SUPPORTED_ARCHITECTURES.
    """
    folder = Path(folder)
    cfg, dtype = load_config(folder), parse_dtype(dtype)
    tied = frozenset({"lm_head.weight"}) if cfg.tie_word_embeddings else frozenset()
    return build_model(cfg, load_state_dict(folder, dtype, skip=tied), dtype)


def release_memory() -> None:
    """Drop what torch's exporter still references, collect garbage and hand the freed heap
    back to the operating system. The exporter (through dynamo's caches) keeps every module
    it traced alive after `export()` returns, weights included, until `torch.compiler.reset()`
    (after the 0.5B draft's export and quantization in-process, malloc_trim alone returned 1.1
    of 4.6 GB); glibc keeps freed memory in its arenas, counted in the RSS, until
    `malloc_trim(0)` (a no-op on other C libraries)."""
    torch.compiler.reset()
    gc.collect()
    with contextlib.suppress(AttributeError, OSError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def weightless_model(folder: str | Path) -> CausalLM:
    """The folder's model on the meta device: its config, module tree and float32 dtype, no
    weights (what the export cache's keys need, without reading gigabytes)."""
    cfg = load_config(Path(folder))
    with torch.device("meta"):
        return model_class(cfg)(cfg)


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer (chat template included).

    A folder whose tokenizer_config.json names the generic `tokenizers` backend gets exactly
    that class: AutoTokenizer would otherwise pick the model family's class by config.json
    and re-interpret tokenizer.json with that family's pre-tokenizer.
    """
    folder = Path(folder)
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if cfg.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
