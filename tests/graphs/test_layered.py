"""The per-layer export and its assembled ranges (graphs.layered): every range equals a
whole-range export bit for bit, any ℓe comes from one export, and the cache stays honest."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mirror_sd.devices.ort_split import export_split, split_needs_weights
from mirror_sd.graphs import export as ex
from mirror_sd.graphs import export_cache, layered, load_model
from mirror_sd.graphs.loader import weightless_model
from mirror_sd.graphs.masks import causal_mask, tree_mask
from tests.conftest import FAMILIES, make_tiny, save_tiny
from tests.graphs.test_export import random_past, run_onnx

KEY = {"tiny": "layered"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (model folder, model, cache folder, parts folder): one per-layer export per
    family for the whole module, whatever order pytest runs the parametrized tests in (an
    indirect parametrization is function-scoped: without this every range case exported the
    parts again, ~10 s each)."""
    made = {}

    def get(family: str):
        if family not in made:
            folder = save_tiny(make_tiny(family, seed=5), tmp_path_factory.mktemp(family))
            model = load_model(folder)
            cache = tmp_path_factory.mktemp(f"cache-{family}")
            made[family] = folder, model, cache, layered.export_layers_cached(model, cache, KEY)
        return made[family]

    return get


@pytest.fixture(params=FAMILIES)
def parts(request, exported):
    """(model folder, model, cache folder, parts folder) of the family in `request.param`."""
    return exported(request.param)


def _inputs(model, first, last, with_embed, s, t, tree=False):
    g = torch.Generator().manual_seed(10 * s + t)
    c = model.config
    x = (
        torch.randint(0, 97, (1, t), generator=g)
        if with_embed
        else torch.randn(1, t, c.hidden_size)
    )
    if tree:  # a branch forest over the cached rows, as a mirror round verifies
        parents = [-1, 0, -1, 2, 3][:t]
        depth = torch.tensor([[0, 1, 0, 1, 2][:t]])
        return x, s + depth, tree_mask(s, parents), random_past(model, range(first, last), s)
    return (
        x,
        torch.arange(s, s + t)[None],
        causal_mask(s, t),
        random_past(model, range(first, last), s),
    )


RANGES = [(0, 2, True, 0, 6, False), (0, 1, True, 5, 1, False), (1, 4, False, 9, 4, False),
          (2, 4, False, 0, 1, False), (0, 4, True, 6, 5, True)]  # fmt: skip
# Every range shape on Gemma 3 (the family whose layers differ from one another: sliding /
# global attention, four norms); a middle range without the embedding and the whole-model tree
# block on Llama, and the tree block on every other family, which splices every one of its
# parts. Each whole-range reference is a full export (~20 s each), so the matrix stays this
# size. Each family's own export is tested in test_export.py.
FULL_MATRIX = ("llama", "gemma3_text")
RANGE_CASES = (
    [("gemma3_text", r) for r in RANGES]
    + [("llama", RANGES[2]), ("llama", RANGES[-1])]
    + [(fam, RANGES[-1]) for fam in FAMILIES if fam not in FULL_MATRIX]
)


@pytest.mark.parametrize(
    ("parts", "case"), RANGE_CASES, indirect=["parts"], ids=[f"{f}-{r}" for f, r in RANGE_CASES]
)
def test_an_assembled_range_equals_a_whole_range_export(parts, tmp_path, case):
    """Same interface, same numbers: the splice computes what one export of the range does."""
    first, last, with_embed, s, t, tree = case
    _, model, cache, _ = parts
    path = layered.range_cached(model, cache, KEY, first, last, with_embed)
    whole = ex.export_stages(model, tmp_path / "w.onnx", first, last, with_embed, False)
    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (path, whole)
    ]
    names = [
        ([i.name for i in x.get_inputs()], [o.name for o in x.get_outputs()]) for x in sessions
    ]
    assert names[0] == names[1] == ex.io_names(first, last, with_embed, False)
    args = _inputs(model, first, last, with_embed, s, t, tree)
    a = run_onnx(path, first, last, *args, with_embed=with_embed)
    b = run_onnx(whole, first, last, *args, with_embed=with_embed)
    for x, y in zip([a[0], *a[1]], [b[0], *b[1]], strict=True):
        np.testing.assert_array_equal(x, y)


def test_every_split_comes_from_one_export_without_new_weight_bytes(parts):
    """Any ℓe's prefix + suffix chain equals the whole model's hidden state; the ranges add
    graphs only (their weights are the parts' data files)."""
    _, model, cache, folder = parts
    before = sum(f.stat().st_size for f in folder.glob("*.data"))
    n, s, t = model.num_layers, 3, 2
    ids, pos, mask, past = _inputs(model, 0, n, True, s, t)
    whole, _ = run_onnx(
        layered.range_cached(model, cache, KEY, 0, n, True), 0, n, ids, pos, mask, past
    )
    for exit_layer in range(1, n):
        pre = layered.range_cached(model, cache, KEY, 0, exit_layer, True)
        suf = layered.range_cached(model, cache, KEY, exit_layer, n, False)
        h, _ = run_onnx(pre, 0, exit_layer, ids, pos, mask, past[:exit_layer])
        out, _ = run_onnx(suf, exit_layer, n, torch.from_numpy(h), pos, mask, past[exit_layer:],
                          with_embed=False)  # fmt: skip
        np.testing.assert_allclose(out, whole, atol=1e-5)
    assert sum(f.stat().st_size for f in folder.glob("*.data")) == before
    assert sorted(p.name for p in folder.glob("*.onnx.data")) == sorted(
        ["embed.onnx.data", *(f"{layered.part_name(i)}.onnx.data" for i in range(n))]
    )
    for r in folder.glob("range-*.onnx"):  # every initializer points at a part's data file
        m = onnx.load(str(r), load_external_data=False)
        locations = {
            e.value for t_ in m.graph.initializer for e in t_.external_data if e.key == "location"
        }
        assert locations <= {p.name for p in folder.glob("*.onnx.data")}


@pytest.mark.parametrize("parts", FULL_MATRIX, indirect=True)
def test_a_cached_split_needs_no_weights(parts, tmp_path):
    """Once the parts are cached, a weightless (meta) model builds every split: compile()
    then never reads the target's weights for a second ℓe."""
    folder, model, _, _ = parts
    fresh = tmp_path / "onnx"
    meta = weightless_model(folder)
    assert split_needs_weights(meta, fresh, KEY, 2)
    export_split(model, fresh, KEY, 2)
    for exit_layer in (1, 2, 3):
        assert not split_needs_weights(meta, fresh, KEY, exit_layer)
    graphs = export_split(meta, fresh, KEY, 3)  # no torch export: assembled from the parts
    assert graphs.prefix.parent == graphs.suffix.parent == layered.layers_entry(meta, fresh, KEY)
    assert split_needs_weights(meta, fresh, KEY, 3, quantize="int8") is False  # from fp32 ONNX


def test_the_layers_entry_is_one_cache_entry(parts, tmp_path):
    """`cache prune` sees the parts and their ranges as one entry (`model.onnx` marks it
    complete) and removing it removes them all; the next call exports again."""
    _, model, cache, folder = parts
    listed = [e for e in export_cache.entries(cache) if e.path == folder]
    assert len(listed) == 1
    assert listed[0].bytes >= sum(f.stat().st_size for f in folder.glob("*.data"))


def test_a_quantized_range_is_quantized_from_the_assembled_fp32_range(parts):
    _, model, cache, folder = parts
    q = layered.range_cached(model, cache, KEY, 0, 2, True, quantize="int8")
    assert q.parent != folder and q.name == "model.onnx"
    ops = {n.op_type for n in onnx.load(str(q), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    assert layered.range_cached(model, cache, KEY, 0, 2, True, quantize="int8") == q  # reused


def test_a_bad_range_is_a_clear_error(parts):
    _, model, cache, _ = parts
    with pytest.raises(IndexError, match=r"layer range \[3, 3\) empty or outside \[0, 4\]"):
        layered.range_cached(model, cache, KEY, 3, 3, False)


@pytest.mark.parametrize(("family", "kinds"), [("llama", 1), ("gemma3_text", 2)])
def test_the_exporter_runs_once_per_kind_of_layer(family, kinds, tmp_path, monkeypatch):
    """Layers differing only in weights share one export (Llama's four: one call); Gemma 3's
    sliding and full attention layers are two kinds. Each part still decodes as its own
    layer: every part's output equals torch's layer on the same input, bit for bit where the
    exporter's own per-layer graph is (checked above through the assembled ranges)."""
    model = load_model(save_tiny(make_tiny(family, seed=3), tmp_path / family))
    calls = []
    real = layered.export_program
    monkeypatch.setattr(layered, "export_program", lambda *a, **k: calls.append(1) or real(*a, **k))
    layered._export_parts(model, tmp_path / "parts", ex.DEFAULT_OPSET)
    assert len(calls) == kinds
    kinds_seen = {layered.layer_kind(layer) for layer in model.model.layers}
    assert len(kinds_seen) == kinds
    h, cos, sin, bias, *_, pk, pv = layered._examples(model)["layer"]
    h = torch.randn(h.shape)
    pk, pv = torch.randn(pk.shape), torch.randn(pv.shape)
    cos, sin = model.rope(torch.arange(5, 8)[None], torch.float32)
    feeds = ex.graph_feeds(causal_mask(5, 3))
    bias = ex.additive_mask(torch.from_numpy(feeds.pop("mask")), torch.float32)
    index = [torch.from_numpy(v) for v in feeds.values()]  # key_index, row_index, row_slot
    for i in range(model.num_layers):
        sess = ort.InferenceSession(str(tmp_path / "parts" / f"{layered.part_name(i)}.onnx"))
        got = sess.run(None, {"h": h.numpy(), "cos": cos.numpy(), "sin": sin.numpy(),
                              "bias": bias.numpy(), **feeds, "past_k": pk.numpy(),
                              "past_v": pv.numpy()})  # fmt: skip
        with torch.no_grad():
            want = layered._Layer(model, i)(h, cos, sin, bias, *index, pk, pv)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w.numpy(), atol=2e-5, rtol=1e-4)
