"""A draft whose LM head keeps only a `VocabTrim`'s K rows, and its cached ONNX export.

The head is the largest matmul of a small draft (Qwen2.5-0.5B: 151,936 x 896 = 136M of its
494M weights), and a draft only *proposes*: keeping the K tokens the target emits most often
cuts the step time while the target still verifies with its full head (lossless). The
trimmed model emits (T, K) logits; `devices.trimmed.TrimmedVocabRunner` scatters them back
to (T, V) with -inf outside the kept set.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from mirror_sd.graphs.export import export_cached
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.quantize import linear_weight
from mirror_sd.graphs.vocab_trim import VocabTrim


def trim_identity(trim: VocabTrim) -> str:
    """A short hash of the kept ids (in order) and V: the trim's part of an export's cache key."""
    blob = json.dumps([trim.vocab_size, list(trim.keep)]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def with_trimmed_head(model: CausalLM, trim: VocabTrim) -> CausalLM:
    """A copy of `model` whose `lm_head` holds only the kept rows, in `trim.keep` order.

    Every other weight is shared with `model` (no copy of the backbone); the head rows are
    cloned, so a head tied to the embedding table is untied and the embedding keeps all V
    rows (the draft still reads every token the target commits). `model` is not modified.

    Raises:
        ValueError: the trim was made for a different vocabulary size.
    """
    if trim.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"VocabTrim over {trim.vocab_size} tokens does not fit a model with a vocabulary of "
            f"{model.config.vocab_size}; make the trim from counts over this model's tokenizer"
        )
    weight = linear_weight(model.lm_head)  # dense, if weight-only quantized
    head = nn.Linear(weight.shape[1], trim.size, bias=False, device=weight.device,
                     dtype=weight.dtype)  # fmt: skip
    head.weight = nn.Parameter(trim.trim(weight), requires_grad=False)  # (K, D), cloned rows
    out = copy.copy(model)  # a new module object sharing the submodules ...
    out._modules = dict(model._modules)  # ... with its own table, so the swap stays local
    out.lm_head = head
    return out


def export_trimmed(
    model: CausalLM,
    folder: str | Path,
    key_info: Mapping[str, Any],
    trim: VocabTrim,
    quantize: str | None = None,
) -> Path:
    """Export the whole `model` (untrimmed) with its head trimmed by `trim`, cached.

    The trim's identity joins `key_info`, so exports for different K (or different kept
    ids) never share a file; the folder name carries "-v<K>". Returns the `model.onnx` path.
    """
    info = {**key_info, "vocab_trim": trim_identity(trim)}
    return export_cached(with_trimmed_head(model, trim), folder, info, quantize=quantize,
                         label=f"-v{trim.size}")  # fmt: skip
