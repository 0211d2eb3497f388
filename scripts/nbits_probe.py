"""What ONNX Runtime's MatMulNBits (accuracy level 4: int8 activations) does on this CPU, for
choosing a lossless weight format (docs/benchmarks.md, *Where an int4 token goes*).

    .venv/bin/python scripts/nbits_probe.py [--out probe.json]

Two questions, on Qwen2.5-1.5B's MLP shapes with random weights (the answers are about the
kernels, not the model):

1. Row invariance per block size: is each row of a block of M rows bit for bit the row of a
   70-row block? A target is lossless against its own one-row decoding only where every M a
   round uses (1 for a step, γ + 1 for verification) agrees.
2. Is int8 MatMulNBits holding the same int4 values (and scales) bit-equal to int4
   MatMulNBits, and faster for a long prompt? If it were, a prompt could go through it
   without changing the int4 target's output.

Times are medians of warm runs with the weights cache-resident (small matrices): they compare
kernels, they are not a model's step. The machine (CPU model, flags) is recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mirror_sd.devices.cpu_caps import host_caps  # noqa: E402

SHAPES = ((1536, 8960), (8960, 1536))  # (K, N): gate/up and down projections
ROWS = (1, 2, 3, 4, 5, 8, 17, 64)


def session(q: np.ndarray, scales: np.ndarray, bits: int, block: int) -> ort.InferenceSession:
    """MatMulNBits over int4 values `q` (N, K/block, block) stored as `bits`-bit weights."""
    n, nb, _ = q.shape
    if bits == 4:
        u = (q + 8).astype(np.uint8)
        packed = u[:, :, 0::2] | (u[:, :, 1::2] << 4)
    else:
        packed = (q.astype(np.int16) + 128).astype(np.uint8)
    k = nb * block
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=4)  # fmt: skip
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.ravel(), "S")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])  # fmt: skip
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def weights(k: int, n: int, block: int, rng: np.random.Generator):
    q = rng.integers(-8, 8, size=(n, k // block, block)).astype(np.int8)
    return q, (rng.random((n, k // block)) * 0.02 + 0.001).astype(np.float32)


def ms(s: ort.InferenceSession, a: np.ndarray, reps: int = 9) -> float:
    s.run(None, {"A": a})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, {"A": a})
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    caps = host_caps()
    doc = {"machine": {"cpu": caps.model, "flags": sorted(f for f in caps.flags
                                                          if f.startswith(("avx", "amx")))},
           "onnxruntime": ort.__version__, "row_invariance": {}, "int8_holding_int4": {}}  # fmt: skip
    for block in (32, 64, 128):
        agree = {m: True for m in ROWS}
        for k, n in SHAPES:
            s = session(*weights(k, n, block, rng), 4, block)
            a = rng.standard_normal((70, k)).astype(np.float32)
            full = s.run(None, {"A": a})[0]
            for m in ROWS:
                agree[m] &= bool(np.array_equal(s.run(None, {"A": a[:m]})[0], full[:m]))
        doc["row_invariance"][f"int4 block {block}"] = agree
        print(
            f"int4 block {block}: rows equal to a 70-row block's at M = "
            f"{[m for m in ROWS if agree[m]]}, differ at M = {[m for m in ROWS if not agree[m]]}"
        )
    for k, n in SHAPES:
        q, scales = weights(k, n, 32, rng)
        s4, s8 = session(q, scales, 4, 32), session(q, scales, 8, 32)
        out = {}
        for m in (1, 5, 700):
            a = rng.standard_normal((m, k)).astype(np.float32)
            y4, y8 = s4.run(None, {"A": a})[0], s8.run(None, {"A": a})[0]
            out[m] = {"bit_equal": bool(np.array_equal(y4, y8)),
                      "max_abs_diff": float(np.abs(y4 - y8).max()),
                      "int4_ms": ms(s4, a), "int8_ms": ms(s8, a)}  # fmt: skip
            print(f"{k}x{n} M={m}: int8 holding int4 bit-equal {out[m]['bit_equal']} (max diff "
                  f"{out[m]['max_abs_diff']:.2g}); int4 {out[m]['int4_ms']:.2f} ms, int8 "
                  f"{out[m]['int8_ms']:.2f} ms")  # fmt: skip
        doc["int8_holding_int4"][f"{k}x{n}"] = out
    print(f"{caps.model}; {' '.join(doc['machine']['flags'])}; onnxruntime {ort.__version__}")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
