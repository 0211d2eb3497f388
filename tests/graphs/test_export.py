"""ONNX export of stage ranges: ORT equals torch, external data, int8, and the export cache."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mirror_sd.graphs import export as ex
from mirror_sd.graphs import load_model, onnx_quant
from mirror_sd.graphs.masks import causal_mask, tree_mask
from tests.conftest import FAMILIES, make_tiny, save_tiny

TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(model, whole-model ONNX path) per family, through the session-wide export cache."""
    folder = save_tiny(make_tiny(request.param), tmp_path_factory.mktemp(request.param))
    model = load_model(folder)
    cache = tmp_path_factory.getbasetemp() / "onnx-cache"
    return model, ex.export_cached(model, cache, {"tiny": request.param, "seed": 0})


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    folder = save_tiny(make_tiny("qwen2", seed=3), tmp_path_factory.mktemp("qwen2-s3"))
    return load_model(folder)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and those of its subgraphs (an If's branches), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)


def run_torch(model, first, last, x, pos, mask, past):
    """Reference: layers [first, last) through CausalLM's own stages and a StaticKVCache
    preloaded with `past` ([(k, v)] per layer, (1, S, nkv, hd)); returns (out, new k/v list)."""
    s, t = past[0][0].shape[1], pos.shape[1]
    cache = model.new_cache(s + t)
    for j, (k, v) in enumerate(past):
        cache.k[first + j, :, :s], cache.v[first + j, :, :s] = k, v
    cache.length = s
    with torch.no_grad():
        h = model.embed(x) if x.dtype == torch.long else x
        h = model.run_layers(first, last, h, pos, mask, cache)
        out = model.head(h) if last == model.num_layers else h
    new = [t_ for i in range(first, last) for t_ in (cache.k[i, :, s:], cache.v[i, :, s:])]
    return out, new


def random_past(model, layers, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    shape = (1, s, c.num_kv_heads, c.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in layers]


def run_onnx(path, first, last, x, pos, mask, past, with_embed=True):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids" if with_embed else "hidden": x.numpy(),
        "position_ids": pos.numpy(),
        **ex.graph_feeds(mask),
    }
    if any(i.name == "logits_rows" for i in sess.get_inputs()):  # a graph with the head
        feeds["logits_rows"] = np.arange(x.shape[1])
    for i, (k, v) in zip(range(first, last), past, strict=True):
        feeds[f"past_k_{i}"], feeds[f"past_v_{i}"] = k.numpy(), v.numpy()
    out = sess.run(None, feeds)
    return out[0], out[1:]


def assert_close(onnx_out, onnx_new, ref_out, ref_new):
    assert onnx_out.shape == tuple(ref_out.shape)
    assert np.abs(onnx_out - ref_out.numpy()).max() <= TOL
    assert len(onnx_new) == len(ref_new)
    for a, b in zip(onnx_new, ref_new, strict=True):
        assert a.shape == tuple(b.shape)
        assert np.abs(a - b.numpy()).max() <= TOL


@pytest.mark.parametrize(("s", "t"), [(0, 1), (0, 6), (5, 1), (9, 4)])
def test_whole_model_equals_torch(exported, s, t):
    model, path = exported
    layers = range(model.num_layers)
    ids = torch.randint(0, 97, (1, t), generator=torch.Generator().manual_seed(s + t))
    pos, mask, past = torch.arange(s, s + t)[None], causal_mask(s, t), random_past(model, layers, s)
    ref = run_torch(model, 0, model.num_layers, ids, pos, mask, past)
    assert_close(*run_onnx(path, 0, model.num_layers, ids, pos, mask, past), *ref)


def test_whole_model_under_a_tree_mask(exported):
    model, path = exported
    s, parents = 6, [-1, 0, -1, 2, -1]
    ids, depth = torch.tensor([[11, 12, 21, 22, 31]]), torch.tensor([[0, 1, 0, 1, 0]])
    pos, mask, past = s + depth, tree_mask(s, parents), random_past(model, range(4), s, seed=1)
    ref = run_torch(model, 0, model.num_layers, ids, pos, mask, past)
    assert_close(*run_onnx(path, 0, model.num_layers, ids, pos, mask, past), *ref)


@pytest.mark.parametrize(
    ("first", "last", "with_embed"), [(1, 3, False), (0, 2, True), (2, 4, False)]
)
def test_stage_ranges_equal_torch(qwen2, tmp_path, first, last, with_embed):
    with_head = last == qwen2.num_layers
    path = ex.export_stages(qwen2, tmp_path / "s.onnx", first, last, with_embed, with_head)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = ex.io_names(first, last, with_embed, with_head)
    assert [i.name for i in sess.get_inputs()] == inputs
    assert [o.name for o in sess.get_outputs()] == outputs
    s, t = 4, 3
    g = torch.Generator().manual_seed(first)
    x = torch.randint(0, 97, (1, t), generator=g) if with_embed else torch.randn(1, t, 64)
    pos, mask, past = (
        torch.arange(s, s + t)[None],
        causal_mask(s, t),
        random_past(qwen2, range(first, last), s),
    )
    out, new = run_onnx(path, first, last, x, pos, mask, past, with_embed)
    assert_close(out, new, *run_torch(qwen2, first, last, x, pos, mask, past))


def test_external_data_is_one_file_beside_the_graph(qwen2, tmp_path):
    path = ex.export_stages(qwen2, tmp_path / "m.onnx", 0, 4, True, True, external_data=True)
    files = onnx_quant.model_files(path)
    assert files == [path, tmp_path / "m.onnx.data"]
    assert files[1].stat().st_size > files[0].stat().st_size
    ids, pos, mask = torch.tensor([[1, 2, 3]]), torch.arange(3)[None], causal_mask(0, 3)
    ref = run_torch(qwen2, 0, 4, ids, pos, mask, random_past(qwen2, range(4), 0))
    assert_close(*run_onnx(path, 0, 4, ids, pos, mask, random_past(qwen2, range(4), 0)), *ref)


def test_int8_quantizes_matmuls_and_embedding(exported, tmp_path):
    model, path = exported
    q = ex.quantize_int8(path, tmp_path / "q.onnx")
    ops = Counter(n.op_type for n in all_nodes(onnx.load(str(q)).graph))
    assert ops["MatMulNBits"] == 7 * 4 + 1  # every linear (q k v o gate up down), the head
    assert ops["If"] == 4  # attention: row by row for a short block, GEMMs for a long one
    assert ops["MatMul"] == 2 * 2 * 4  # what stays: attention's activation products
    assert ops["DequantizeLinear"] == 1  # the embedding table
    # tiny: the graph itself weighs a lot; a tied table is kept twice (int8 lookup, 8-bit head)
    limit = 0.65 if model.config.tie_word_embeddings else 0.6
    assert q.stat().st_size < limit * path.stat().st_size
    ids = torch.tensor([[5, 17, 3, 44, 9]])
    out, _ = run_onnx(q, 0, 4, ids, torch.arange(5)[None], causal_mask(0, 5),
                      random_past(model, range(4), 0))  # fmt: skip
    assert out.shape == (1, 5, 97) and np.isfinite(out).all()


def test_int4_quantizes_matmuls_and_agrees_with_fp32(exported, tmp_path):
    """4-bit MatMulNBits weights: smaller than int8, and still mostly the fp32 top-1 token."""
    model, path = exported
    q8 = ex.quantize_int8(path, tmp_path / "q8.onnx")
    q4 = ex.quantize_int4(path, tmp_path / "q4.onnx")
    nodes = [n for n in onnx.load(str(q4)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 7 * 4 + 1
    assert {a.i for n in nodes for a in n.attribute if a.name == "bits"} == {4}
    assert q4.stat().st_size < q8.stat().st_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (1, 48), generator=g)
    args = (0, 4, ids, torch.arange(48)[None], causal_mask(0, 48), random_past(model, range(4), 0))
    ref, _ = run_onnx(path, *args)
    out, _ = run_onnx(q4, *args)
    agree = float((ref.argmax(-1) == out.argmax(-1)).mean())
    assert 0.6 <= agree <= 1.0, agree
    assert np.abs(out - ref).max() < 0.5 * np.abs(ref).max()  # an approximation, not noise


def test_quantize_weights_rejects_other_bit_widths(exported, tmp_path):
    with pytest.raises(ValueError, match="bits=3"):
        onnx_quant.quantize_weights(exported[1], tmp_path / "q.onnx", 3)


def test_bad_layer_range_is_a_clear_error(qwen2, tmp_path):
    with pytest.raises(IndexError, match=r"\[2, 9\) outside \[0, 4\]"):
        ex.export_stages(qwen2, tmp_path / "x.onnx", 2, 9, False, False)


def test_export_is_quiet_about_torchvision_only_during_our_exports(qwen2, tmp_path, monkeypatch):
    """torch's exporter logs "torchvision is not installed. Skipping torchvision::nms" (and
    roi_align, roi_pool) on every export; `quiet_exporter` drops that logger's warnings during
    our exports only: its errors pass, and the filter is gone afterwards."""
    import contextlib
    import logging

    logger = logging.getLogger(ex.EXPORTER_REGISTRY_LOGGER)
    seen: list[logging.LogRecord] = []
    sink = logging.Handler(logging.DEBUG)  # on the logger itself: torch's own handler sits on
    sink.emit = seen.append  # `torch.onnx` (no propagation to pytest's), bound to one stream
    logger.addHandler(sink)
    try:
        with monkeypatch.context() as m:  # control: the unfiltered exporter does warn
            m.setattr(ex, "quiet_exporter", contextlib.nullcontext)
            ex.export_stages(qwen2, tmp_path / "loud.onnx", 1, 2, False, False)
        assert any("torchvision" in r.getMessage() for r in seen)
        seen.clear()
        ex.export_stages(qwen2, tmp_path / "quiet.onnx", 1, 2, False, False)
        assert not [r.getMessage() for r in seen if r.levelno == logging.WARNING]
        assert logger.filters == []
        with ex.quiet_exporter():
            logger.warning("a warning inside")
            logger.error("an error inside")
        logger.warning("a warning after")
        assert [r.getMessage() for r in seen] == ["an error inside", "a warning after"]
    finally:
        logger.removeHandler(sink)


# --- the export cache (the exporter itself is faked: these test naming and reuse) ----------
@pytest.fixture
def fake_export(monkeypatch):
    calls: list[tuple] = []

    def export(model, path, first, last, with_embed, with_head, opset=ex.DEFAULT_OPSET):
        calls.append((first, last, with_embed, with_head))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"graph")
        Path(f"{path}.data").write_bytes(b"weights")
        return Path(path)

    def quantizer(bits):
        def quantize(src, dst):
            calls.append((bits,))
            Path(dst).write_bytes(f"{bits} graph".encode())
            return Path(dst)

        return quantize

    monkeypatch.setattr(ex, "export_stages", export)
    monkeypatch.setattr(ex, "quantize_int8", quantizer("int8"))
    monkeypatch.setattr(ex, "quantize_int4", quantizer("int4"))
    return calls


def test_export_cache_reuses_an_identical_export(qwen2, tmp_path, fake_export):
    key = {"folder": "/models/x", "files": [["model.safetensors", 10, 123]]}
    first = ex.export_cached(qwen2, tmp_path, key)
    assert first.name == "model.onnx" and first.read_bytes() == b"graph"
    assert onnx_quant.model_files(first) == [first, first.with_name("model.onnx.data")]
    os.utime(first.parent, (1.0, 1.0))
    assert ex.export_cached(qwen2, tmp_path, dict(key)) == first
    assert len(fake_export) == 1  # the second call exported nothing
    assert first.parent.stat().st_mtime > 1e9  # reuse marks the entry used (cache prune: LRU)
    assert [p.name for p in tmp_path.iterdir()] == [first.parent.name]  # no temp dirs left


def test_export_cache_quantizes_the_cached_fp32_export(qwen2, tmp_path, fake_export):
    fp32 = ex.export_cached(qwen2, tmp_path, {})
    int8 = ex.export_cached(qwen2, tmp_path, {}, quantize="int8")
    int4 = ex.export_cached(qwen2, tmp_path, {}, quantize="int4")
    assert fake_export == [(0, 4, True, True), ("int8",), ("int4",)]  # one export, reused
    assert int8.read_bytes() == b"int8 graph" and "-int8-" in int8.parent.name
    assert int4.read_bytes() == b"int4 graph" and "-int4-" in int4.parent.name
    assert fp32.read_bytes() == b"graph"
    # int8 entries keep the key they had before int4 (and labels) existed: no re-export
    settings = dict(first=0, last=4, with_embed=True, with_head=True, quantize="int8",
                    opset=ex.DEFAULT_OPSET)  # fmt: skip
    assert int8.parent.name.endswith("-int8-" + ex.cache_key(qwen2, {}, **settings)[:16])


@pytest.mark.parametrize(
    "change",
    [
        {"key": {"folder": "/models/x", "files": [["model.safetensors", 10, 124]]}},  # mtime
        {"last": 2, "with_head": False},
        {"quantize": "int8"},
        {"quantize": "int4"},
        {"opset": 19},
    ],
)
def test_export_cache_key_covers_weights_range_and_quantization(
    qwen2, tmp_path, fake_export, change
):
    key = {"folder": "/models/x", "files": [["model.safetensors", 10, 123]]}
    base = ex.export_cached(qwen2, tmp_path, key)
    other = ex.export_cached(qwen2, tmp_path, change.pop("key", key), **change)
    assert other != base and other.is_file() and len(fake_export) >= 2


def test_export_cache_rejects_unknown_quantization(qwen2, tmp_path):
    with pytest.raises(ValueError, match="quantize='int2'"):
        ex.export_cached(qwen2, tmp_path, {}, quantize="int2")


def test_source_identity_changes_with_the_weights(tmp_path):
    folder = save_tiny(make_tiny("llama"), tmp_path / "m")
    before = ex.source_identity(folder)
    assert [f[0] for f in before["files"]] == ["config.json", "model.safetensors"]
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert ex.source_identity(folder) != before


def test_the_cache_key_does_not_depend_on_the_path_to_the_model(tmp_path):
    """One model folder reached through a symbolic link (MIRROR_SD_CACHE pointing elsewhere)
    keys the same exports: the key holds the weights' identity, not the path string."""
    folder = save_tiny(make_tiny("llama"), tmp_path / "m")
    (tmp_path / "link").symlink_to(folder)
    keys = [ex.cache_key(load_model(f), ex.source_identity(f)) for f in (folder, tmp_path / "link")]
    assert keys[0] == keys[1]


def test_without_keep_source_only_the_quantized_export_stays(qwen2, tmp_path, fake_export):
    """A quantized draft's fp32 intermediate is removed when this call made it (disk), kept
    when it was already cached; find_cached sees exactly what export_cached would reuse."""
    int8 = ex.export_cached(qwen2, tmp_path, {}, quantize="int8", keep_source=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [int8.parent.name]
    assert ex.find_cached(qwen2, tmp_path, {}, "int8") == int8
    assert ex.find_cached(qwen2, tmp_path, {}) is None
    fp32 = ex.export_cached(qwen2, tmp_path, {})
    ex.export_cached(qwen2, tmp_path, {}, quantize="int4", keep_source=False)
    assert fp32.is_file()  # it was there before: kept
    assert fake_export == [(0, 4, True, True), ("int8",), (0, 4, True, True), ("int4",)]
