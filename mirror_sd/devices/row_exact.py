"""Does this CPU's MatMulNBits compute a lone row as it computes the same row in a block?

A quantized target stays lossless against its own decoding only if a verification block scores
each row bit for bit as a one-row decoding step does (docs/runtime.md, *Row invariance*).
ONNX Runtime's MatMulNBits is row-invariant for every M >= 2, but whether its M = 1 kernel (a
separate GEMV path) rounds like the M >= 2 one depends on the CPU: equal on the AMX Xeon, and
for int8 on AVX2, but int4 on an AVX2-only EPYC sums in another order (last-bit differences,
which int8 activation quantization and 28 layers turn into a changed token at a near-tie).

`one_row_exact(bits)` measures it once per process on a small MatMulNBits at the export's block
size and accuracy level. Where it is False a runner decodes a lone row as a block of two: the
row and a throw-away copy one position later (`pad_rows`), whose logits are dropped and whose
K/V row lies past the cache's length (the next step overwrites it). The lone row then takes the
M >= 2 kernel, the same one verification takes, at the price of one extra row's arithmetic.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch

PROBE_K, PROBE_N, PROBE_ROWS = 512, 256, 4  # small, but several quantization blocks per row


def matmul_model(w: np.ndarray, name: str = "matmul"):
    """A one-node ONNX model y = x @ w, `w` (K, N) float32 an initializer, x (M, K)."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@functools.cache
def one_row_exact(bits: int) -> bool:
    """True when a `bits`-bit MatMulNBits (the export's block size and accuracy level) gives a
    lone row bit for bit the result of that row inside a block, on this CPU."""
    import onnxruntime as ort

    from mirror_sd.graphs.onnx_quant import (
        QUANT_ACCURACY_LEVEL,
        QUANT_BLOCK,
        import_matmul_nbits,
    )

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((PROBE_K, PROBE_N)) * 0.05).astype(np.float32)
    model = matmul_model(w, "probe")
    nbits = import_matmul_nbits()
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=QUANT_ACCURACY_LEVEL, bits=bits
    )
    quantizer = nbits.MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=config)
    quantizer.process()
    session = ort.InferenceSession(
        quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = rng.standard_normal((PROBE_ROWS, PROBE_K)).astype(np.float32)
    block = session.run(None, {"x": x})[0]
    return all(
        np.array_equal(session.run(None, {"x": x[i : i + 1]})[0][0], block[i])
        for i in range(PROBE_ROWS)
    )


def needs_padding(quantize: str | None) -> bool:
    """Whether a runner of weights `quantize` ("int8" / "int4" / None) decodes lone rows as
    blocks of two on this CPU. fp32 graphs never need it (tests/graphs/test_row_invariance.py)."""
    from mirror_sd.graphs.row_quant import ROWS_KINDS

    if quantize in (None, "none") or quantize in ROWS_KINDS:  # exact integer GEMM at every M
        return False
    return not one_row_exact(int(quantize.removeprefix("int")))


def pad_rows(
    rows: torch.Tensor | np.ndarray, position_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor | np.ndarray, torch.Tensor, torch.Tensor]:
    """One row (1, 1, ...) -> a block of two: the row, then a copy of it one position later
    that sees the row (causal). Returns (rows, position_ids (1, 2), mask (1, 2, S + 1))."""
    if isinstance(rows, np.ndarray):
        rows = np.concatenate([rows, rows], axis=1)
    else:
        rows = torch.cat([rows, rows], dim=1)
    position_ids = torch.as_tensor(position_ids)
    position_ids = torch.cat([position_ids, position_ids + 1], dim=1)
    mask = torch.as_tensor(mask)
    first = torch.cat([mask[:, :1], torch.zeros(1, 1, 1, dtype=mask.dtype)], dim=2)
    second = torch.cat([mask[:, :1], torch.ones(1, 1, 1, dtype=mask.dtype)], dim=2)
    return rows, position_ids, torch.cat([first, second], dim=1)
