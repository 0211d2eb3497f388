"""`quantize: int7-rows`: int8-rows' graph and kernel with weights in [-64, 64], so that MLAS's
u8s8 GEMM cannot saturate its 16-bit pair sums on any CPU (AVX2 without VNNI included:
docs/benchmarks.md, *int8-rows needs VNNI*). Exact integer results, row invariance and a
lossless plan, on whatever CPU runs the suite."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from mirror_sd import api
from mirror_sd.devices.row_exact import matmul_model
from mirror_sd.graphs import export as ex
from mirror_sd.graphs import load_model
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.row_quant import PINS, ROWS_KINDS, ROWS_QMAX_NO_VNNI, rewrite_rows
from tests.conftest import make_tiny, save_tiny
from tests.graphs.test_row_invariance import BLOCK, PROMPT, Graph, _cat, _prefill
from tests.test_api import ORT_TARGET_MAP, assert_modes_match_ar, folders  # noqa: F401

K, N = 96, 16


def test_int7_rows_computes_the_exact_integer_product_on_this_cpu():
    """Rows of the pinned activation range [-1, 1] (u8 255 / 0 at the ends) against weights at
    the edge of the range: ORT's result is the integer product of the quantized operands, which a
    saturating pair sum would miss by far more than the tolerance."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[::2] = np.abs(w).max(0)  # every other row at +max: pairs of +64 weights
    model = matmul_model(w)
    rewrite_rows(model, ROWS_QMAX_NO_VNNI)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q, scale = inits["w_q8"].astype(np.int64), inits["w_s8"].astype(np.float64)
    assert np.abs(q).max() == ROWS_QMAX_NO_VNNI
    x = np.where(rng.random((3, K)) < 0.5, 1.0, -1.0).astype(np.float32)  # u8 255 and 0
    x[0] = 1.0  # all 255 against pairs of +64: the largest pair sums the kernel can meet
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    xp = np.concatenate([x, np.broadcast_to(PINS, (3, 2))], 1)
    u8 = np.clip(np.round(xp / (2 / 255)) + 128, 0, 255).astype(np.int64)
    exact = ((u8 - 128) @ q) * (2 / 255) * scale
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)


def test_int7_rows_is_the_int8_rows_graph_with_a_narrower_weight_range():
    w = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    graphs = {}
    for kind, qmax in ROWS_KINDS.items():
        m = matmul_model(w)
        rewrite_rows(m, qmax)
        graphs[kind] = m
        q = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w_q8"))
        assert np.abs(q).max() == qmax, kind
    assert [n.op_type for n in graphs["int7-rows"].graph.node] == [
        n.op_type for n in graphs["int8-rows"].graph.node
    ]
    with pytest.raises(ValueError, match="qmax"):
        rewrite_rows(matmul_model(w), 200)


def test_an_int7_rows_block_scores_each_row_as_decoding_it_alone(tmp_path_factory):
    folder = save_tiny(make_tiny("qwen2", seed=1), tmp_path_factory.mktemp("qwen2"))
    model = load_model(folder)
    cache = tmp_path_factory.getbasetemp() / "onnx-cache-int7"
    path = ex.export_cached(model, cache, {"tiny": "qwen2", "seed": 1}, quantize="int7-rows")
    graph = Graph(path, model.num_layers)
    ids = np.random.default_rng(0).integers(0, 97, (1, PROMPT + BLOCK))
    _, past = _prefill(graph, model, ids[:, :PROMPT])
    block, pos = ids[:, PROMPT:], np.arange(PROMPT, PROMPT + BLOCK)[None]
    logits, new = graph.run(block, pos, causal_mask(PROMPT, BLOCK).numpy(), past)
    for j in range(BLOCK):  # no padding: the integer GEMM is exact at every M
        one, step = graph.run(block[:, j : j + 1], pos[:, j : j + 1],
                              causal_mask(PROMPT + j, 1).numpy(), past)  # fmt: skip
        assert np.array_equal(one[0, 0], logits[0, j]), f"row {j}: logits differ"
        past = _cat(past, step)


def test_an_int7_rows_target_is_lossless_against_its_own_decoding(folders):  # noqa: F811
    target, draft, root = folders
    text = ORT_TARGET_MAP.replace(
        "tgt: {backend: onnxruntime,", "tgt: {backend: onnxruntime, quantize: int7-rows,"
    )
    with api.compile(target, draft, text, onnx_dir=root / "onnx", max_len=256) as p:
        assert p.target.quantize == "int7-rows"
        assert "reference: the int7-rows-weight target" in api.describe(p)
        assert_modes_match_ar(p, "int7-rows", trees_and_batches=True)
