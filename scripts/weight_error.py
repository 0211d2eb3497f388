"""How far our quantized weights are from the checkpoint's: the target's linears of a few
layers, de-quantized back from `quantize: int4` (ONNX Runtime's own MatMulNBits quantizer:
symmetric, one scale per 32 weights), `quantize: int8-rows` and `quantize: int7-rows`
(`graphs/row_quant`: one scale per output column, weights in [-127, 127] / [-64, 64]),
against the folder's weights (for a zoo model, the GGUF de-quantized to fp32).

    .venv/bin/python scripts/weight_error.py [--model qwen2.5-coder-1.5b] [--layers 0,14,27]

Prints per tensor kind: the largest |error|, that over the 32-weight block's range (max - min:
a Q4_K block's 16 levels are 1/15 of it apart), and the relative RMS error ||dW|| / ||W||.
docs/models.md records the table.
"""

from __future__ import annotations

import argparse

import numpy as np
from onnxruntime.capi._pybind_state import quantize_matmul_4bits
from safetensors import safe_open

from mirror_sd.graphs import zoo
from mirror_sd.graphs.row_quant import ROWS_KINDS, _quantized

BLOCK = 32
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def int4(w_kn: np.ndarray) -> np.ndarray:
    """(K, N) weights through ORT's symmetric block-32 int4 quantizer, de-quantized."""
    k, n = w_kn.shape
    blocks = k // BLOCK
    packed = np.zeros((n, blocks, BLOCK // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zp = np.zeros((n, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w_kn), scales, zp, BLOCK, n, k, True)
    q = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks, BLOCK).astype(np.float32)
    return ((q - 8) * scales[..., None]).reshape(n, k).T


def rows(w_kn: np.ndarray, kind: str) -> np.ndarray:
    """(K, N) weights through `kind`'s per-column quantizer (ROWS_KINDS), de-quantized."""
    q, scale = _quantized(w_kn, ROWS_KINDS[kind])
    return q[:-2].astype(np.float32) * scale


def stats(w: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    blocks = w.T.reshape(w.shape[1], -1, BLOCK)
    span = (blocks.max(-1) - blocks.min(-1))[..., None]
    err = np.abs(d - w).T.reshape(blocks.shape)
    of_span = float((err / np.where(span > 0, span, 1)).max())
    return float(err.max()), of_span, float(np.linalg.norm(d - w) / np.linalg.norm(w))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--layers", default="0,14,27")
    args = ap.parse_args()
    folder = zoo.resolve_model(args.model)
    formats = ("int4/32", *ROWS_KINDS)
    print(
        "| tensor | "
        + " | ".join(f"{f}: max abs err | of block range | rel. RMS" for f in formats)
        + " |"
    )
    print("| --- |" + " ---: |" * 3 * len(formats))
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        for layer in (int(x) for x in args.layers.split(",")):
            for kind in KINDS:
                w = f.get_tensor(f"model.layers.{layer}.{kind}.weight").astype(np.float32).T
                cells = [*stats(w, int4(w))]
                for fmt in ROWS_KINDS:
                    cells += stats(w, rows(w, fmt))
                print(f"| {layer}.{kind} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")


if __name__ == "__main__":
    main()
