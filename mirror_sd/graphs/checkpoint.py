"""The precision a model folder's weights were published at (`partition.precision` input).

A folder `mirror-sd models fetch` converted from a GGUF file holds fp32 tensors de-quantized
from that file: its fetch record (`gguf_fetch.FETCH_MARKER`) names the GGUF, whose
quantization type is in the file name (`...-q4_k_m.gguf`, `...Q8_0.gguf`). Any other Hugging
Face folder says its dtype in config.json (`torch_dtype`, or `dtype` in newer transformers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mirror_sd.graphs.gguf_fetch import FETCH_MARKER

# GGUF quantization types by the widest format that holds them without loss of range:
# <= 4 bits -> int4; 5, 6, 8 bits -> int8; float types by name
_GGUF_TYPES = (
    (re.compile(r"(?:^|[-_.])i?q[1-4](?:_[a-z0-9]+)*(?=[-_.]|$)", re.I), "int4"),
    (re.compile(r"(?:^|[-_.])q[5-8](?:_[a-z0-9]+)*(?=[-_.]|$)", re.I), "int8"),
    (re.compile(r"(?:^|[-_.])bf16(?=[-_.]|$)", re.I), "bfloat16"),
    (re.compile(r"(?:^|[-_.])f16(?=[-_.]|$)", re.I), "float16"),
)
_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16",
           "float32": "float32", "float": "float32"}  # fmt: skip


def gguf_precision(file_name: str) -> str:
    """ "int4" | "int8" | "bfloat16" | "float16" | "float32" from a GGUF file's name."""
    stem = file_name.removesuffix(".gguf")
    for pattern, precision in _GGUF_TYPES:
        if pattern.search(stem):
            return precision
    return "float32"


def checkpoint_precision(folder: str | Path) -> str:
    """The precision `folder`'s weights were published at (see the module docstring)."""
    folder = Path(folder)
    marker = folder / FETCH_MARKER
    if marker.is_file():
        gguf = json.loads(marker.read_text(encoding="utf-8")).get("gguf_file")
        if gguf:
            return gguf_precision(gguf)
    cfg = folder / "config.json"
    if cfg.is_file():
        doc = json.loads(cfg.read_text(encoding="utf-8"))
        dtype = doc.get("torch_dtype") or doc.get("dtype")
        return _DTYPES.get(str(dtype), "float32")
    return "float32"
