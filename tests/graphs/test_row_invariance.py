"""Row invariance of exported graphs: a row's logits and K/V are bit-for-bit the same whether
the row runs alone (one decoding step) or inside a block (verification) or a batch.

This is what keeps a quantized target lossless against its own greedy decoding: with int8
activations (MatMulNBits accuracy level 4) a last-bit difference between a block's arithmetic
and a single row's can cross a quantization boundary and change a token (docs/runtime.md,
*Row invariance*). Exact equality, not a tolerance, is the assertion. What is not invariant
(documented there): rows whose visible keys are not contiguous, i.e. a tree block's later
branches and a packed batch's sequences."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mirror_sd.devices.row_exact import needs_padding, pad_rows
from mirror_sd.graphs import export as ex
from mirror_sd.graphs import load_model
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.model import ROW_INVARIANT_ROWS
from tests.conftest import make_tiny, save_tiny

PROMPT, BLOCK = 7, 5  # prefilled rows, then a block of γ + 1 = 5 rows


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family_model(request, tmp_path_factory):
    folder = save_tiny(make_tiny(request.param, seed=1), tmp_path_factory.mktemp(request.param))
    return load_model(folder), tmp_path_factory.getbasetemp() / "onnx-cache", request.param


class Graph:
    """One exported whole model in an ORT session, fed numpy arrays."""

    def __init__(self, path, layers: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2  # several threads: the split of work must not matter
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.layers = layers

    def run(self, ids, pos, mask, past, pad=False):
        """ids (B, T); past [(k, v)] per layer, each (B, S, nkv, hd) -> logits, [(k, v)].
        `pad`: a lone row runs as a block of two, as the runners do where
        `row_exact.needs_padding` says so; the copy's outputs are dropped."""
        if pad:
            padded = pad_rows(ids, torch.from_numpy(pos), torch.from_numpy(mask))
            logits, new = self.run(padded[0], padded[1].numpy(), padded[2].numpy(), past)
            return logits[:, :1], [(k[:, :1], v[:, :1]) for k, v in new]
        feeds = {"input_ids": ids, "position_ids": pos, "mask": mask}
        for i, (k, v) in enumerate(past):
            feeds[f"past_k_{i}"], feeds[f"past_v_{i}"] = k, v
        out = self.sess.run(None, feeds)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.layers)]


def _cat(past, new):
    """The cache after `new` rows: [(k, v)] per layer, each (1, S + T, nkv, hd)."""
    return [(np.concatenate([k, nk], 1), np.concatenate([v, nv], 1))
            for (k, v), (nk, nv) in zip(past, new, strict=True)]  # fmt: skip


def _prefill(graph, model, ids):
    c = model.config
    empty = np.zeros((ids.shape[0], 0, c.num_kv_heads, c.head_dim), np.float32)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    t = ids.shape[1]
    mask = np.broadcast_to(causal_mask(0, t).numpy(), (ids.shape[0], t, t)).copy()
    return graph.run(ids, pos, mask, [(empty, empty)] * model.num_layers)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_block_scores_each_row_as_decoding_it_alone_would(family_model, quantize):
    model, cache, family = family_model
    path = ex.export_cached(model, cache, {"tiny": family, "seed": 1}, quantize=quantize)
    graph = Graph(path, model.num_layers)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (1, PROMPT + BLOCK))
    _, past = _prefill(graph, model, ids[:, :PROMPT])
    block = ids[:, PROMPT:]
    pos = np.arange(PROMPT, PROMPT + BLOCK)[None]
    logits, new = graph.run(block, pos, causal_mask(PROMPT, BLOCK).numpy(), past)
    for j in range(BLOCK):  # decode the same rows one at a time
        one, step = graph.run(block[:, j : j + 1], pos[:, j : j + 1],
                              causal_mask(PROMPT + j, 1).numpy(), past, needs_padding(quantize))  # fmt: skip
        assert np.array_equal(one[0, 0], logits[0, j]), f"row {j}: logits differ"
        for (k, v), (bk, bv) in zip(step, new, strict=True):
            assert np.array_equal(k[0, 0], bk[0, j]) and np.array_equal(v[0, 0], bv[0, j])
        past = _cat(past, step)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_padded_lone_row_is_the_lone_row(family_model, quantize):
    """Padding a lone row into a block of two (row_exact.pad_rows) changes nothing about the
    row: same logits and K/V as the row alone, up to the kernels' M = 1 rounding (exact in
    fp32, where every MatMul's M = 1 path is row-invariant)."""
    model, cache, family = family_model
    path = ex.export_cached(model, cache, {"tiny": family, "seed": 1}, quantize=quantize)
    graph = Graph(path, model.num_layers)
    ids = np.random.default_rng(3).integers(0, 97, (1, PROMPT + 1))
    _, past = _prefill(graph, model, ids[:, :PROMPT])
    args = (ids[:, PROMPT:], np.array([[PROMPT]]), causal_mask(PROMPT, 1).numpy(), past)
    alone, kv_alone = graph.run(*args)
    padded, kv_padded = graph.run(*args, pad=True)
    assert padded.shape == alone.shape and not needs_padding(None)
    same = np.array_equal if quantize is None else lambda a, b: np.allclose(a, b, atol=1e-3)
    assert same(alone, padded)
    for (k, v), (pk, pv) in zip(kv_alone, kv_padded, strict=True):
        assert same(k, pk) and same(v, pv)


def test_long_blocks_take_the_gemm_path_and_agree_to_rounding(family_model):
    """Past ROW_INVARIANT_ROWS rows (prefill) attention runs as ordinary GEMMs: not bitwise
    equal to row by row, but the same function."""
    model, cache, family = family_model
    path = ex.export_cached(model, cache, {"tiny": family, "seed": 1})
    graph = Graph(path, model.num_layers)
    t = ROW_INVARIANT_ROWS + 3
    ids = np.random.default_rng(2).integers(0, 97, (1, t))
    long, _ = _prefill(graph, model, ids)
    short, _ = _prefill(graph, model, ids[:, :ROW_INVARIANT_ROWS])
    assert np.abs(long[0, :ROW_INVARIANT_ROWS] - short[0]).max() < 1e-4
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.arange(t)[None], causal_mask(0, t),
                    model.new_cache(t))  # fmt: skip
    assert np.abs(long - ref.numpy()).max() < 1e-4
