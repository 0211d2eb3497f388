"""A trained self-draft as an ordinary Hugging Face folder (`adapter.train_adapter` writes it).

The folder holds the target's config with num_hidden_layers = k + 1, the target's
embedding, layers [0, k), final norm and LM head with the adapter as layer k (in the
target's stored dtype), the target's tokenizer and generation files, and the provenance
file `ADAPTER_FILE`, written last: a folder that has it is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mirror_sd.graphs.gguf_fetch import FETCH_MARKER
from mirror_sd.graphs.model import DecoderLayer

ADAPTER_FILE = "mirror_sd_adapter.json"
"""Provenance file of a trained self-draft folder; written last, so it marks the folder done."""
_WEIGHTS = "model.safetensors"
_NOT_COPIED = {"config.json", "model.safetensors.index.json", FETCH_MARKER, ADAPTER_FILE}


def _config_for(target_folder: Path, k: int) -> dict[str, Any]:
    """The target's config.json with k + 1 layers (per-layer lists trimmed to match)."""
    cfg = json.loads((target_folder / "config.json").read_text())
    cfg["num_hidden_layers"] = k + 1
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][: k + 1]
    if isinstance(cfg.get("max_window_layers"), int):
        cfg["max_window_layers"] = min(cfg["max_window_layers"], k + 1)
    return cfg


def _draft_state(
    raw: dict[str, torch.Tensor], k: int, adapter: DecoderLayer, tied: bool
) -> dict[str, torch.Tensor]:
    """The target's embedding, layers [0, k), final norm and LM head, plus the adapter as
    layer k, all in the target's stored dtype."""
    dtype = raw["model.embed_tokens.weight"].dtype
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) < k:
                state[name] = tensor
        elif name in ("model.embed_tokens.weight", "model.norm.weight") or (
            name == "lm_head.weight" and not tied
        ):
            state[name] = tensor
    for name, tensor in adapter.state_dict().items():
        state[f"model.layers.{k}.{name}"] = tensor.detach().to(dtype).contiguous()
    return state


def write_draft_folder(
    target_folder: Path, raw: dict[str, torch.Tensor], k: int, adapter: DecoderLayer,
    out: Path, provenance: dict[str, Any],
) -> Path:  # fmt: skip
    """Write the self-draft as a Hugging Face folder: config, weights, the target's tokenizer
    and generation files, and the provenance file last. Built beside `out` and renamed into
    place, so a folder with the provenance file is always complete.

    Raises:
        FileExistsError: `out` exists, is not empty and is not a self-draft folder.
    """
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not (out / ADAPTER_FILE).is_file():
        raise FileExistsError(f"{out} exists and is not a self-draft folder; choose another -o")
    cfg = _config_for(target_folder, k)
    tied = bool(cfg.get("tie_word_embeddings", False))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(target_folder.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name not in _NOT_COPIED:
            shutil.copy2(f, tmp / f.name)
    save_file(_draft_state(raw, k, adapter, tied), tmp / _WEIGHTS, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / ADAPTER_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """The provenance of a self-draft folder (what `train_adapter` wrote)."""
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a trained self-draft (no {ADAPTER_FILE})")
    return json.loads(path.read_text())
