"""Row invariance of exported graphs: a row's logits and K/V are bit-for-bit the same whether
the row runs alone (one decoding step) or inside a block (verification) or a batch.

This is what keeps a quantized target lossless against its own greedy decoding: with int8
activations (MatMulNBits accuracy level 4) a last-bit difference between a block's arithmetic
and a single row's can cross a quantization boundary and change a token (docs/runtime.md,
*Row invariance*). Exact equality, not a tolerance, is the assertion. Rows whose visible keys
are not contiguous (a packed batch's sequences, a tree's branches) are regrouped
(`masks.group_rows`) so that they are invariant too."""

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
        feeds = {"input_ids": ids, "position_ids": pos, **ex.graph_feeds(mask),
                 "logits_rows": np.arange(ids.shape[1])}  # fmt: skip
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


@pytest.mark.parametrize("quantize", [None, "int8", "int4", "int8-rows"])
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


@pytest.mark.parametrize("quantize", [None, "int8", "int4", "int8-rows"])
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


@pytest.mark.parametrize("quantize", [None, "int8", "int4", "int8-rows"])
def test_a_packed_batch_scores_each_sequence_as_alone(family_model, quantize):
    """Two sequences packed in one cache with interleaved columns (prefills one after the
    other, then verification blocks of both in one forward, then holes from rejected rows):
    every logit and K/V row is bit for bit what the sequence computes alone. Without the
    regrouping (each row's keys gathered into a prefix) the interleaved zero-weight keys
    change the attention's rounding, which int8 activations turn into tokens."""
    model, cache, family = family_model
    path = ex.export_cached(model, cache, {"tiny": family, "seed": 1}, quantize=quantize)
    graph = Graph(path, model.num_layers)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 97, (1, n)) for n in (PROMPT, PROMPT + 3)]
    blocks = [rng.integers(0, 97, (1, BLOCK)) for _ in prompts]
    alone = []  # each sequence alone: prefill, then its block
    for prompt, block in zip(prompts, blocks, strict=True):
        _, past = _prefill(graph, model, prompt)
        n = prompt.shape[1]
        pos = np.arange(n, n + BLOCK)[None]
        alone.append(graph.run(block, pos, causal_mask(n, BLOCK).numpy(), past))
    # packed: sequence 0's prompt, then sequence 1's (which sees only its own), then both blocks
    c = model.config
    past = [(np.zeros((1, 0, c.num_kv_heads, c.head_dim), np.float32),) * 2] * model.num_layers
    owner: list[int] = []
    for s_, prompt in enumerate(prompts):
        n = prompt.shape[1]
        mask = np.zeros((1, n, len(owner) + n), bool)
        mask[0, :, len(owner) :] = causal_mask(0, n)[0].numpy()
        _, new = graph.run(prompt, np.arange(n)[None], mask, past)
        past, owner = _cat(past, new), owner + [s_] * n
    ids = np.concatenate(blocks, axis=1)
    pos = np.concatenate([np.arange(p.shape[1], p.shape[1] + BLOCK) for p in prompts])[None]
    who = np.repeat([0, 1], BLOCK)
    mask = np.concatenate(
        [np.array(owner)[None, :] == who[:, None], (who[:, None] == who[None, :])
         & np.tri(2 * BLOCK, dtype=bool)], axis=1)[None]  # fmt: skip
    logits, new = graph.run(ids, pos, mask, past)
    for s_, (one, kv) in enumerate(alone):
        rows = slice(s_ * BLOCK, (s_ + 1) * BLOCK)
        assert np.array_equal(one[0], logits[0, rows]), f"sequence {s_}: logits differ"
        for (k, v), (bk, bv) in zip(kv, new, strict=True):
            assert np.array_equal(k[0], bk[0, rows]) and np.array_equal(v[0], bv[0, rows])


@pytest.mark.parametrize("quantize", [None, "int4", "int8-rows"])
def test_a_token_tree_scores_each_path_as_its_chain(family_model, quantize):
    """A tree block (a root, two children, a grandchild under the second child): each row's
    logits and K/V are bit for bit those of its root-to-node path verified as a chain, though
    a sibling's rows sit between its ancestors' (regrouped by `masks.group_rows`)."""
    from mirror_sd.graphs.masks import tree_mask

    model, cache, family = family_model
    path = ex.export_cached(model, cache, {"tiny": family, "seed": 1}, quantize=quantize)
    graph = Graph(path, model.num_layers)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 97, (1, PROMPT))
    _, past = _prefill(graph, model, ids)
    parents, tokens = [-1, 0, 0, 2], rng.integers(0, 97, (1, 4))
    depth = [0, 1, 1, 2]
    pos = np.array([[PROMPT + d for d in depth]])
    logits, new = graph.run(tokens, pos, tree_mask(PROMPT, parents).numpy(), past)
    for leaf_path in ([0, 1], [0, 2, 3]):
        n = len(leaf_path)
        chain, kv = graph.run(tokens[:, leaf_path], np.arange(PROMPT, PROMPT + n)[None],
                              causal_mask(PROMPT, n).numpy(), past)  # fmt: skip
        for j, row in enumerate(leaf_path):
            assert np.array_equal(chain[0, j], logits[0, row]), f"row {row}: logits differ"
            for (k, v), (bk, bv) in zip(kv, new, strict=True):
                assert np.array_equal(k[0, j], bk[0, row]) and np.array_equal(v[0, j], bv[0, row])
