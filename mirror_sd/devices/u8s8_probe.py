"""Measure whether int8-rows' GEMM is exact on this CPU: ONNX Runtime's DynamicQuantizeMatMul
(MLAS u8s8) on one row of +1s, the pinned range `graphs.row_quant` gives every row (u8 255,
zero point 128), against int8 weights all equal to w. Exact: 2/255 * 127 * w * K.

Without VNNI, AMX or Arm dot products MLAS multiplies through vpmaddubsw, whose 16-bit sums of
two u8 x s8 products saturate once 2 * 255 * w > 32767 (w > 64); `partition.precision`'s
U8S8_EXACT_FLAGS is the rule, tests/partition/test_u8s8_exact.py holds it to this measurement.

    python -m mirror_sd.devices.u8s8_probe    # JSON: CPU model, flags, measured / exact per w
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mirror_sd.graphs.row_quant import PINS, ROWS_QMAX

K, N = 64, 8
PROBE_WEIGHTS = (1, 63, 64, 65, 100, ROWS_QMAX)


def u8s8_ratio(w: int) -> float:
    """Measured / exact for one row of +1s through K int8 weights equal to `w` (1.0: exact)."""
    x = np.concatenate([np.ones((1, K), np.float32), PINS[None]], 1)
    q = np.full((K + 2, N), w, np.int8)
    q[K:] = 0  # the pins' rows, as row_quant makes them
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "z"], ["y"],
                          domain="com.microsoft")],
        "u8s8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K + 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(q, "w"), numpy_helper.from_array(np.ones(N, np.float32), "s"),
         numpy_helper.from_array(np.zeros(N, np.int8), "z")],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = float(sess.run(None, {"x": x})[0][0, 0])
    return got / (2 / 255 * 127 * w * K)


def main() -> None:
    from mirror_sd.devices.cpu_caps import host_caps

    caps = host_caps()
    print(json.dumps({
        "cpu": caps.model, "cpu_flags": " ".join(sorted(caps.flags)),
        "onnxruntime": ort.__version__, "predicted_exact": caps.u8s8_exact,
        "measured_over_exact": {str(w): round(u8s8_ratio(w), 6) for w in PROBE_WEIGHTS},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
