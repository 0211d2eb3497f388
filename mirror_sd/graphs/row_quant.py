"""`quantize: int8-rows` / `int7-rows`: int8 weights per output column through ORT's
DynamicQuantizeMatMul (MLAS's prepacked u8s8 GEMM), made row-invariant. int8-rows (|w| <= 127)
is exact only with VNNI, AMX-INT8 or Arm dot products: without them MLAS's 16-bit pair sums
saturate for |w| > 64 (`partition.precision` `U8S8_EXACT_FLAGS`, `devices/u8s8_probe.py`).
int7-rows keeps the same int8 storage and kernel with weights in [-64, 64] (129 levels), where
two u8 x s8 products sum to at most 2 * 255 * 64 = 32640 < 32767: exact on every CPU.

DynamicQuantizeMatMul quantizes its whole input with one scale and zero point taken from the
tensor's minimum and maximum, so as it stands one row's result depends on the rows beside it:
not what a lossless target can verify with (docs/runtime.md, *Row invariance*). This rewrite
makes the scale the same for every input. Each row is divided by its largest |x| (so it lies
in [-1, 1]), and two columns, +1 and -1, are appended with zero weights, so that the tensor's
range is exactly [-1, 1] whatever the rows: scale 2/255 and zero point 128 for every M. The
integer GEMM works per element (saturated or not), the conversion back to float too, and the
row's factor is multiplied back last, so each row's result is bit for bit the same alone or in
any block (tests/graphs/test_row_invariance.py). Activations are quantized per row (8 bits)
rather than per 32 values as MatMulNBits does, and weights per column rather than per 32:
simulated on Qwen2.5-Coder-1.5B, 93% top-1 agreement with fp32 against 84% for the int4
target (docs/benchmarks.md, *Bytes per token on the AVX-512 EPYC*).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROWS_QMAX = 127  # int8-rows weights: symmetric int8 per output column
ROWS_QMAX_NO_VNNI = 64  # int7-rows: the largest |w| whose u8s8 pair sums cannot saturate
ROWS_KINDS = {"int8-rows": ROWS_QMAX, "int7-rows": ROWS_QMAX_NO_VNNI}  # quantize key -> qmax
PINS = np.array([1.0, -1.0], np.float32)  # the two appended activation columns


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _quantized(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights (K + 2, N) in [-qmax, qmax] with two zero rows for the pins, float32
    scales (N,))."""
    scale = np.abs(w).max(0) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
    return np.concatenate([q, np.zeros((2, w.shape[1]), np.int8)]), scale


def _row_matmul(x: str, y: str, w: str, p: str, opset: int) -> list[onnx.NodeProto]:
    """Nodes computing y = x @ W with `w`'s quantized initializers (`{w}_q8`, ...); `p` prefixes
    the intermediate names."""
    reduce = (
        helper.make_node("ReduceMax", [f"{p}abs", "rq_last"], [f"{p}max"], keepdims=1)
        if opset >= 18
        else helper.make_node("ReduceMax", [f"{p}abs"], [f"{p}max"], axes=[-1], keepdims=1)
    )
    return [
        helper.make_node("Abs", [x], [f"{p}abs"]),
        reduce,
        helper.make_node("Max", [f"{p}max", "rq_tiny"], [f"{p}r"]),
        helper.make_node("Div", [x, f"{p}r"], [f"{p}xn"]),
        helper.make_node("Shape", [x], [f"{p}lead"], end=-1),
        helper.make_node("Concat", [f"{p}lead", "rq_two"], [f"{p}pshape"], axis=0),
        helper.make_node("Expand", ["rq_pins", f"{p}pshape"], [f"{p}pins"]),
        helper.make_node("Concat", [f"{p}xn", f"{p}pins"], [f"{p}xp"], axis=-1),
        helper.make_node(
            "DynamicQuantizeMatMul",
            [f"{p}xp", f"{w}_q8", f"{w}_s8", f"{w}_z8"],
            [f"{p}yn"],
            domain="com.microsoft",
        ),  # fmt: skip
        helper.make_node("Mul", [f"{p}yn", f"{p}r"], [y]),
    ]


def rewrite_rows(model: onnx.ModelProto, qmax: int = ROWS_QMAX) -> int:
    """Every MatMul of `model` whose second input is a 2-D float initializer becomes the
    row-invariant int8 subgraph with weights in [-qmax, qmax] (in place; the float weights are
    dropped). Returns how many."""
    g, opset = model.graph, _opset(model)
    if opset < 15:
        raise ValueError(f"int8-rows needs opset >= 15 (Shape's `end`); the graph has {opset}")
    if not 0 < qmax <= ROWS_QMAX:
        raise ValueError(f"qmax={qmax}: int8 weights need 0 < qmax <= {ROWS_QMAX}")
    inits = {i.name: i for i in g.initializer}
    users: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes, done, dropped = [], set(), set()
    for i, node in enumerate(g.node):
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        name = w.name
        if name not in done:
            q, scale = _quantized(numpy_helper.to_array(w), qmax)
            g.initializer.extend([
                numpy_helper.from_array(q, f"{name}_q8"), numpy_helper.from_array(scale, f"{name}_s8"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_z8"),
            ])  # fmt: skip
            done.add(name)
        nodes += _row_matmul(node.input[0], node.output[0], name, f"rq{i}_", opset)
        users[name] -= 1
        if users[name] == 0:
            dropped.add(name)
    if not done:
        return 0
    keep = [i for i in g.initializer if i.name not in dropped]
    del g.initializer[:]
    g.initializer.extend(keep)
    g.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), "rq_last"),
        numpy_helper.from_array(np.array(1e-30, np.float32), "rq_tiny"),
        numpy_helper.from_array(np.array([2], np.int64), "rq_two"),
        numpy_helper.from_array(PINS, "rq_pins"),
    ])  # fmt: skip
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(done)


def quantize_rows(src: str | Path, dst: str | Path, large: bool, qmax: int = ROWS_QMAX) -> Path:
    """`src`'s MatMuls rewritten by `rewrite_rows` (weights in [-qmax, qmax]), saved at `dst`
    (external data if `large`)."""
    model = onnx.load(str(src))
    rewrite_rows(model, qmax)
    onnx.save_model(model, str(dst), save_as_external_data=large,
                    location=Path(dst).name + ".data" if large else None)  # fmt: skip
    return Path(dst)
