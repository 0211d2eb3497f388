"""The #16 example maps (examples/device_maps/distributed/) load and place on models of the
shape each was written for, and the paper's simulated setting plans as docs/distributed.md says.

They live beside, not in, examples/device_maps/: their layer ranges name a real model's layers
(tests/test_api.py's shipped-map test compiles every map there on a 4-layer model)."""

from dataclasses import replace
from pathlib import Path

import pytest
from transformers import Qwen2Config

from mirror_sd.graphs.config import from_hf_config
from mirror_sd.graphs.model_graph import ModelGraph
from mirror_sd.partition import choose, load_device_map, place
from mirror_sd.pipelined import spans_devices
from mirror_sd.simulated import sim_profile, with_absolute_profiles

FOLDER = Path(__file__).parents[2] / "examples" / "device_maps" / "distributed"
# file -> (target layers, heads, KV heads) of the model it is written for
SHAPES = {
    "pipeline_2gpu.yaml": (28, 12, 2),
    "pipeline_cpu.yaml": (28, 12, 2),
    "tp2_cpu.yaml": (28, 12, 2),
    "paper_tp8_npu.yaml": (64, 64, 8),
    "paper_sim.yaml": (64, 64, 8),
}


def _graph(layers: int, heads: int, kv: int) -> ModelGraph:
    def cfg(n):
        return from_hf_config(Qwen2Config(num_hidden_layers=n, hidden_size=heads * 64,
                                          num_attention_heads=heads, num_key_value_heads=kv,
                                          intermediate_size=heads * 128, vocab_size=1000))  # fmt: skip

    return ModelGraph.compose(
        ModelGraph.from_config(cfg(layers), "target", exit_layer=layers // 2),
        ModelGraph.from_config(cfg(2), "draft"),
    )


def test_every_example_map_has_a_shape():
    assert sorted(p.name for p in FOLDER.glob("*.yaml")) == sorted(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_example_map_loads_and_places(name):
    dm = load_device_map(FOLDER / name)
    layers, heads, kv = SHAPES[name]
    placement = place(_graph(layers, heads, kv), dm)
    assert spans_devices(placement, "target") == name.startswith("pipeline")
    tp = [s.tensor_parallel for s in dm.devices.values() if hasattr(s, "tensor_parallel")]
    if name.startswith(("tp2", "paper_tp8")):
        n = max(tp)
        assert heads % n == 0 and kv % n == 0
    if name.startswith("pipeline"):
        assert placement.assignment["target.layers.13"] != placement.assignment["target.layers.14"]


def test_the_papers_simulated_setting_predicts_mirror_ahead():
    dm = with_absolute_profiles(load_device_map(FOLDER / "paper_sim.yaml"))
    prof = sim_profile(dm, dm.devices["gpus"], dm.devices["npus"], 64)
    assert prof.t_target[1] == 0.006 and prof.t_draft[1] == 0.0009
    assert "ASSUMED" in prof.description and "| draft:" in prof.description  # both files
    choice = choose(replace(prof, accept_rate=0.8), dm.speculation, prefer_hidden=False)
    assert choice.best_mode == "mirror"
    assert choice.speedup_mirror > choice.speedup_vanilla > 1
    assert choice.draft_hidden  # the rollouts fit inside the TP target's suffix
