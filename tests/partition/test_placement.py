"""Placement: longest dotted prefix, exact expected maps on hand-sized graphs, cut edges, capabilities."""

from __future__ import annotations

import pytest
import transformers

from mirror_sd.graphs.config import from_hf_config
from mirror_sd.graphs.model_graph import ModelGraph
from mirror_sd.partition import (
    CutEdge,
    PlacementError,
    check_capabilities,
    load_device_map,
    place,
)


def _cfg(layers: int, hidden: int):
    return from_hf_config(
        transformers.LlamaConfig(
            vocab_size=50,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )


@pytest.fixture(scope="module")
def graph() -> ModelGraph:
    """Target: 12 layers, D=16, exit head after layer 1 (ℓe=2). Draft: 2 layers, D=8."""
    return ModelGraph.compose(
        ModelGraph.from_config(_cfg(12, 16), "target", exit_layer=2),
        ModelGraph.from_config(_cfg(2, 8), "draft"),
    )


DEVICES = {
    "gpu": {"backend": "torch", "device": "cuda:0"},
    "cpu": {"backend": "torch"},
    "npu": {"backend": "onnxruntime", "providers": ["CPUExecutionProvider"]},
    "sim": {"backend": "sim", "profile": "p.json"},
}
TARGET = (
    ["target.embed"]
    + [f"target.layers.{i}" for i in range(12)]
    + ["target.exit_head", "target.norm", "target.lm_head"]
)
DRAFT = ["draft.embed", "draft.layers.0", "draft.layers.1", "draft.norm", "draft.lm_head"]


def _map(placement: dict, **speculation):
    return load_device_map(
        {"version": 1, "devices": DEVICES, "placement": placement, "speculation": speculation}
    )


def test_whole_models_to_two_devices(graph):
    p = place(graph, _map({"target": "gpu", "draft": "npu"}))
    assert p.assignment == {**{n: "gpu" for n in TARGET}, **{n: "npu" for n in DRAFT}}
    assert list(p.assignment) == graph.names()  # graph order, deterministic
    assert p.by_device() == {"npu": DRAFT, "gpu": graph.names()[len(DRAFT) :]}


def test_layers_1_does_not_cover_layers_10(graph):
    p = place(graph, _map({"target": "gpu", "target.layers.1": "cpu", "draft": "npu"}))
    assert [n for n, a in p.assignment.items() if a == "cpu"] == ["target.layers.1"]
    assert p.assignment["target.layers.10"] == "gpu"
    assert p.assignment["target.layers.11"] == "gpu"
    assert p.rules["target.layers.1"] == "target.layers.1"
    assert p.rules["target.layers.10"] == "target"


def test_longest_prefix_wins_whatever_the_key_order(graph):
    keys = {
        "target.layers.1": "sim",
        "target.layers": "cpu",
        "target": "gpu",
        "draft": "sim",
        "draft.lm_head": "cpu",
    }
    p = place(graph, _map(keys))
    expected = {n: "gpu" for n in TARGET}
    expected.update({f"target.layers.{i}": "cpu" for i in range(12)})
    expected.update({"target.layers.1": "sim", **{n: "sim" for n in DRAFT}, "draft.lm_head": "cpu"})
    assert p.assignment == expected
    reversed_keys = dict(reversed(list(keys.items())))
    assert place(graph, _map(reversed_keys)) == p


def test_unplaced_nodes_are_listed_with_a_suggested_key(graph):
    with pytest.raises(PlacementError) as info:
        place(graph, _map({"target.layers": "gpu"}))
    assert str(info.value) == (
        "device map: placement: 9 graph node(s) not placed: draft.embed, draft.layers.0, "
        "draft.layers.1, draft.norm, draft.lm_head (and 4 more); add a key that covers them, "
        "e.g. `draft: <alias>`, `target: <alias>` (devices: gpu, cpu, npu, sim)"
    )


def test_a_key_matching_no_node_is_named(graph):
    with pytest.raises(PlacementError) as info:
        place(graph, _map({"target": "gpu", "draft": "npu", "draft.layers.9": "cpu"}))
    assert str(info.value).startswith(
        "device map: placement[draft.layers.9]: matches no graph node; did you mean"
    )
    assert info.value.path == "placement[draft.layers.9]"
    with pytest.raises(
        PlacementError, match=r"placement\[targets\]: matches no graph node; did you mean 'target'"
    ):
        place(graph, _map({"targets": "gpu", "draft": "npu"}))


def test_cut_edges_and_bytes_per_round(graph):
    # γ=3 -> T = 4 block rows; κ=2. Target hidden D=16: 4·16·4 = 256 B.
    # Token channel: (γ+1)·κ·(4+4) = 4·2·8 = 64 B.
    p = place(
        graph,
        _map(
            {"target": "gpu", "target.layers.1": "cpu", "draft": "sim"},
            num_draft_tokens=3,
            exit_top_k=2,
        ),
    )
    assert p.cut_edges() == [
        ("target.layers.0", "target.layers.1", 256),
        ("target.layers.1", "target.exit_head", 256),
        ("target.layers.1", "target.layers.2", 256),
        ("target.exit_head", "draft.embed", 64),
    ]
    assert isinstance(p.cut_edges()[0], CutEdge)


def test_no_cut_edges_on_one_device(graph):
    assert place(graph, _map({"target": "cpu", "draft": "cpu"})).cut_edges() == []


def test_draft_cut_uses_the_draft_hidden_size(graph):
    p = place(graph, _map({"target": "gpu", "draft": "cpu", "draft.layers.1": "sim"}))
    # default γ=4 -> T = 5 rows; draft D=8: 5·8·4 = 160 B; token channel 5·4·8 = 160 B.
    assert p.cut_edges() == [
        ("draft.layers.0", "draft.layers.1", 160),
        ("draft.layers.1", "draft.norm", 160),
        ("target.exit_head", "draft.embed", 160),
    ]


def test_onnxruntime_runs_whole_models_only(graph):
    with pytest.raises(PlacementError) as info:
        place(graph, _map({"target": "gpu", "target.lm_head": "npu", "draft": "npu"}))
    assert str(info.value) == (
        "device map: placement[target]: node target.embed is on 'gpu' but the rest of the "
        "target is on onnxruntime device 'npu', which runs whole models in schema v1; place "
        "all of it with `target: npu`"
    )
    with pytest.raises(PlacementError) as info:
        place(graph, _map({"target": "gpu", "draft": "npu", "draft.lm_head": "cpu"}))
    assert str(info.value) == (
        "device map: placement[draft.lm_head]: node draft.lm_head is on 'cpu' but the rest of "
        "the draft is on onnxruntime device 'npu', which runs whole models in schema v1; place "
        "all of it with `draft: npu`"
    )


def test_onnxruntime_may_run_the_whole_target(graph):
    p = place(graph, _map({"target": "npu", "draft": "cpu"}))
    assert set(p.by_device()["npu"]) == {n for n in graph.names() if n.startswith("target.")}


def test_sim_and_torch_run_anything(graph):
    dm = _map({"target": "sim", "target.layers.5": "cpu", "draft": "sim", "draft.norm": "gpu"})
    p = place(graph, dm, check_capability=False)
    check_capabilities(p, dm)  # no error
    assert p.assignment["draft.norm"] == "gpu" and p.assignment["target.layers.5"] == "cpu"


def test_exit_layer_is_checked_against_the_graph(graph):
    with pytest.raises(PlacementError) as info:
        place(graph, _map({"target": "gpu", "draft": "npu"}, exit_layer=12))
    assert str(info.value) == (
        "device map: speculation.exit_layer: 12 is out of range for a target with 12 layers; "
        "valid: 1..11 or auto"
    )
    with pytest.raises(
        PlacementError, match="built for exit_layer 2; rebuild the graph with exit_layer=5"
    ):
        place(graph, _map({"target": "gpu", "draft": "npu"}, exit_layer=5))
    assert place(graph, _map({"target": "gpu", "draft": "npu"}, exit_layer=2)).assignment


def test_place_accepts_yaml_text(graph):
    text = """
version: 1
devices:
  cpu: {backend: torch, threads: 1}
  ortcpu: {backend: onnxruntime, providers: [CPUExecutionProvider: {}]}
placement: {target: cpu, draft: ortcpu}
"""
    p = place(graph, text)
    assert p.by_device() == {"ortcpu": DRAFT, "cpu": graph.names()[len(DRAFT) :]}
