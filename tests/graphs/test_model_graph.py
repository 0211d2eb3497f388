"""ModelGraph: names, records, JSON round trip."""

import pytest

from mirror_sd.graphs.config import load_config
from mirror_sd.graphs.model_graph import ModelGraph


def test_stage_names_and_records(tiny_hf):
    family, hf, folder = tiny_hf
    cfg = load_config(folder)
    g = ModelGraph.from_config(cfg, "target")
    names = g.names()
    assert names == ["target.embed"] + [f"target.layers.{i}" for i in range(4)] + [
        "target.norm",
        "target.lm_head",
    ]
    layer_params = sum(p.numel() for p in hf.model.layers[0].parameters())
    assert g.stage("target.layers.0").param_bytes == 4 * layer_params
    assert g.stage("target.layers.2").kv_bytes_per_token == 2 * 2 * cfg.head_dim * 4
    assert g.stage("target.embed").param_bytes == 4 * 97 * 64


def test_exit_head_hangs_off_exit_layer(tiny_hf):
    g = ModelGraph.from_config(load_config(tiny_hf[2]), "target", exit_layer=3)
    assert list(g.graph.predecessors("target.exit_head")) == ["target.layers.2"]
    with pytest.raises(ValueError, match="exit_layer 4 outside"):
        ModelGraph.from_config(load_config(tiny_hf[2]), exit_layer=4)


def test_json_round_trip_and_compose(tiny_hf, tmp_path):
    cfg = load_config(tiny_hf[2])
    both = ModelGraph.compose(
        ModelGraph.from_config(cfg, "target", exit_layer=2), ModelGraph.from_config(cfg, "draft")
    )
    both.save(tmp_path / "graph.json")
    again = ModelGraph.load(tmp_path / "graph.json")
    assert again == both
    assert "draft.layers.3" in again.names() and again.stage("draft.lm_head").role == "lm_head"
    with pytest.raises(KeyError, match="no stage 'draft.layers.9'"):
        again.stage("draft.layers.9")
