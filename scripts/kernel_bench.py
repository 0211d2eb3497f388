"""Decode-step kernel candidates on this CPU: one Qwen2.5-1.5B MLP projection (1536 -> 8960),
random weights, at 1 row (decoding), 2 rows (a lone row padded where `devices.row_exact`
says so), 5 rows (verifying γ = 4), 64 rows (a prefill chunk) and 671 rows (a long prompt).

    .venv/bin/python scripts/kernel_bench.py [--threads 2] [--seconds 0.5]

Prints the CPU model and its vector/matrix flags, then ms per call for: ONNX Runtime fp32
MatMul, MatMulNBits int4 (block 32) at accuracy levels 4 (int8 activations: the project's
quantized graphs) and 0 (fp32 activations), a row-invariant int8 DynamicQuantizeMatMul (a
candidate, `row_normalized_dqmm`), torch dense and torch's weight-only int8 / int4
kernels at fp32 and bf16 activations. docs/benchmarks.md records the tables; compare ratios
within one run (other load on the machine shifts every number).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from mirror_sd.devices.cpu_caps import host_caps

K, N, BLOCK = 1536, 8960, 32
ROWS = (1, 2, 5, 64, 671)  # 671: the prompt of a Spec-Bench rag question
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def timed(fn, seconds: float) -> float:
    """Median-free mean ms per call over `seconds` after one warm-up call."""
    fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def int4_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K/BLOCK, BLOCK/2) packed uint4 and (N·K/BLOCK,) scales, symmetric around 8."""
    blocks = w.T.reshape(N, K // BLOCK, BLOCK)
    scale = np.abs(blocks).max(-1) / 7 + 1e-8
    q = np.clip(np.round(blocks / scale[..., None]) + 8, 0, 15).astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scale.astype(np.float32)


def ort_sessions(w: np.ndarray, threads: int) -> dict[str, ort.InferenceSession]:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])
    packed, scale = int4_blocks(w)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads

    def session(nodes, inits, domains):
        graph = helper.make_graph(nodes, "g", [x], [y], inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains]
        )
        return ort.InferenceSession(model.SerializeToString(), opts)

    out = {"ort fp32": session([helper.make_node("MatMul", ["x", "w"], ["y"])],
                               [numpy_helper.from_array(w, "w")], [("", 21)])}  # fmt: skip
    for level in (4, 0):
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft",
                                K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=level)  # fmt: skip
        inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scale.ravel(), "s")]
        out[f"ort int4 L{level}"] = session([node], inits, [("", 21), ("com.microsoft", 1)])
    out["ort int8 rows (DQMM)"] = session(*row_normalized_dqmm(w), [("", 21), ("com.microsoft", 1)])
    return out


def row_normalized_dqmm(w: np.ndarray) -> tuple[list, list]:
    """A candidate, not a shipped format: int8 weights per output column through ORT's
    DynamicQuantizeMatMul (MLAS's prepacked u8s8 GEMM), made row-invariant. The op quantizes
    its whole input with one scale from the tensor's min and max, so one row's result would
    depend on the others; dividing each row by its largest |x| and appending the columns +1
    and -1 (with zero weights) pins that scale for every M, the integer GEMM is exact, and the
    row's factor is multiplied back afterwards."""
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    q = np.concatenate([q, np.zeros((2, N), np.int8)])
    nodes = [
        helper.make_node("Abs", ["x"], ["ax"]),
        helper.make_node("ReduceMax", ["ax", "last"], ["mx"], keepdims=1),
        helper.make_node("Max", ["mx", "tiny"], ["r"]),
        helper.make_node("Div", ["x", "r"], ["xn"]),
        helper.make_node("Shape", ["x"], ["lead"], end=-1),
        helper.make_node("Concat", ["lead", "two"], ["pshape"], axis=0),
        helper.make_node("Expand", ["pm", "pshape"], ["pins"]),
        helper.make_node("Concat", ["xn", "pins"], ["xp"], axis=-1),
        helper.make_node(
            "DynamicQuantizeMatMul", ["xp", "q", "s", "z"], ["yn"], domain="com.microsoft"
        ),  # fmt: skip
        helper.make_node("Mul", ["yn", "r"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (q, "q"), (scale, "s"), (np.zeros(N, np.int8), "z"), (np.array([-1], np.int64), "last"),
        (np.array(1e-30, np.float32), "tiny"), (np.array([2], np.int64), "two"),
        (np.array([1.0, -1.0], np.float32), "pm"))]  # fmt: skip
    return nodes, inits


def torch_kernels(w: np.ndarray, dtype: torch.dtype):
    wt = torch.from_numpy(w.T.copy())  # (N, K)
    s8 = wt.abs().amax(1) / 127
    w8 = torch.round(wt / s8[:, None]).to(torch.int8)
    grouped = wt.reshape(N, K // BLOCK, BLOCK)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    sc = (hi - lo).clamp(min=1e-8) / 15
    q = torch.clamp(torch.round((grouped - lo[..., None]) / sc[..., None]), 0, 15)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(N, K), 8)
    sz = torch.stack([sc, lo + 8 * sc], -1).transpose(0, 1).contiguous().to(dtype)
    dense = wt.to(dtype)
    name = str(dtype).removeprefix("torch.")
    return {
        f"torch {name} dense": lambda x: torch.nn.functional.linear(x, dense),
        f"torch int8pack {name}": lambda x: torch._weight_int8pack_mm(x, w8, s8.to(dtype)),
        f"torch int4pack {name}": lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, BLOCK, sz),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=0.5)
    args = ap.parse_args()
    caps = host_caps()
    print(f"cpu: {caps.model}; flags: {', '.join(f for f in SHOWN_FLAGS if f in caps.flags)}")
    torch.set_num_threads(args.threads)
    w = (np.random.default_rng(0).standard_normal((K, N)) * 0.02).astype(np.float32)
    rows = {m: np.random.default_rng(m).standard_normal((m, K)).astype(np.float32) for m in ROWS}
    print("| kernel | " + " | ".join(f"{m} rows ms" for m in ROWS) + " |")
    print("| --- |" + " --- |" * len(ROWS))
    for name, sess in ort_sessions(w, args.threads).items():
        cells = [timed(lambda x=rows[m], s=sess: s.run(None, {"x": x}), args.seconds) for m in ROWS]
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in torch_kernels(w, dtype).items():
            xs = {m: torch.from_numpy(rows[m]).to(dtype) for m in ROWS}
            cells = [timed(lambda x=xs[m], f=fn: f(x), args.seconds) for m in ROWS]
            print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
