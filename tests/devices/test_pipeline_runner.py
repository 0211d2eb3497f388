"""Placement by node executed (#16): a model whose layer ranges run on different devices.

The stages a placement gives, a PipelineRunner equal bit for bit to the single-device
TorchRunner stage by stage, and compile() plans that spread target and draft over devices
and decode exactly like the single-device target (greedy and a sampled χ² check)."""

import re

import pytest
import torch

import mirror_sd.api as api
from mirror_sd.devices.pipeline_runner import PipelineRunner
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.graphs.loader import load_model
from mirror_sd.partition import DeviceMapError, PlacementError
from mirror_sd.partition.stages import Stage, model_stages
from tests.conftest import make_tiny, save_tiny, tiny_pair

SPLIT_MAP = """
version: 1
devices:
  dev0: {backend: torch, device: cpu, threads: 1}
  dev1: {backend: torch, device: cpu, threads: 1}
  dev2: {backend: torch, device: cpu, threads: 1}
placement:
  target: dev0
  target.layers.3: dev1
  target.layers.4: dev1
  target.layers.5: dev1
  target.norm: dev1
  target.lm_head: dev2
  target.exit_head: dev2
  draft: dev1
  draft.layers.1: dev2
speculation: {exit_layer: 2, branch_budget: 4, mode: mirror}
"""

ONE_DEVICE = """
version: 1
devices:
  a: {backend: torch, device: cpu, threads: 1}
placement: {target: a}
speculation: {exit_layer: 2, branch_budget: 4, mode: autoregressive}
"""


def _assignment(n: int, cut: int) -> dict[str, str]:
    a = {"target.embed": "x", "target.norm": "y", "target.lm_head": "y"}
    a.update({f"target.layers.{i}": ("x" if i < cut else "y") for i in range(n)})
    return a


def test_stages_cut_where_the_device_changes():
    assert model_stages(_assignment(4, 2), "target", 4) == [
        Stage("x", embed=True, first=0, last=2),
        Stage("y", first=2, last=4, norm=True, lm_head=True),
    ]
    a = _assignment(4, 4)
    a["target.lm_head"] = "x"  # back to x for the head: three stages
    stages = model_stages(a, "target", 4)
    assert [s.describe() for s in stages] == [
        "x: embed + layers 0-3",
        "y: norm",
        "x: lm_head",
    ]
    assert stages[1].nodes("target") == ["target.norm"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_tiny(make_tiny("qwen2", num_hidden_layers=6), tmp_path_factory.mktemp("m"))
    return load_model(folder, "float32")


def _io(ids, start):
    t = len(ids)
    pos = torch.arange(start, start + t).unsqueeze(0)
    mask = torch.ones(1, t, start + t, dtype=torch.bool).tril(start)
    return torch.tensor([ids]), pos, mask


@pytest.mark.parametrize("cut", [1, 2, 3, 5])
def test_pipeline_equals_the_single_device_runner_stage_by_stage(model, cut):
    dev = TorchDevice("cpu", 1)
    ref = TorchRunner(model, dev, 64, exit_layer=3)
    a = _assignment(6, cut)
    pipe = PipelineRunner(model, model_stages(a, "target", 6), {"x": dev, "y": dev}, 64,
                          exit_layer=3, exit_on="x")  # fmt: skip
    for r in (ref, pipe):
        r.forward(*_io([1, 5, 9, 2], 0))
    assert pipe.length == ref.length == 4
    block = _io([7, 3, 8], 4)
    h_ref, h_pipe = ref.forward_prefix(*block), pipe.forward_prefix(*block)
    assert torch.equal(h_ref, h_pipe)
    assert torch.equal(ref.exit_logits(h_ref), pipe.exit_logits(h_pipe))
    assert torch.equal(
        ref.forward_suffix(h_ref, *block[1:]), pipe.forward_suffix(h_pipe, *block[1:])
    )
    for r in (ref, pipe):  # keep rows 4 and 6 (a branch compaction), then decode on
        r.keep(4, [4, 6])
    nxt = _io([11], 6)
    assert torch.equal(ref.forward(*nxt), pipe.forward(*nxt))
    for r in (ref, pipe):
        r.rollback(3)
    assert torch.equal(ref.forward(*_io([4, 4], 3)), pipe.forward(*_io([4, 4], 3)))


def test_pipeline_rejects_stages_that_do_not_cover_the_model(model):
    dev = TorchDevice("cpu", 1)
    with pytest.raises(ValueError, match="do not run embed, layers 0..5"):
        PipelineRunner(model, [Stage("x", embed=True, first=0, last=3)], {"x": dev}, 8)
    stages = model_stages(_assignment(6, 2), "target", 6)
    mixed = {"x": dev, "y": TorchDevice("cpu", 1, "bfloat16")}
    with pytest.raises(ValueError, match="same dtype"):
        PipelineRunner(model, stages, mixed, 8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(folders):
    """Greedy tokens of the single-device target alone."""
    target, _, _ = folders
    with api.compile(target, None, ONE_DEVICE, max_len=128) as plan:
        return {p: plan.generate(p, 24).tokens for p in ("w1 w2 w3", "w7 w7 w8 w9")}


def test_a_target_and_draft_spread_over_devices_decode_as_the_single_device_target(
    folders, reference
):
    target, draft, _ = folders
    with api.compile(target, draft, SPLIT_MAP, max_len=128) as plan:
        assert isinstance(plan.target, PipelineRunner)
        assert isinstance(plan.draft, PipelineRunner)
        assert plan.target_device.alias == "dev0+dev1+dev2"
        label = plan.target_device.label
        assert "dev0: embed + layers 0-2" in label and "dev1: layers 3-5 + norm" in label
        assert "exit head on dev2" in label
        assert "dev2: layer 1 (" in plan.draft_device.label
        assert "dev1: norm + lm_head" in plan.draft_device.label
        cuts = {(e.src, e.dst) for e in plan.report.placement.cut_edges()}
        assert {
            ("target.layers.2", "target.layers.3"),
            ("draft.layers.0", "draft.layers.1"),
        } <= cuts
        for prompt, ref in reference.items():
            for mode in ("autoregressive", "speculative", "mirror"):
                assert plan.generate(prompt, 24, mode=mode).tokens == ref, (prompt, mode)


def test_the_exit_layer_may_fall_inside_a_stage(folders, reference):
    target, draft, _ = folders
    with api.compile(target, draft, SPLIT_MAP, max_len=128, exit_layer=4) as plan:
        assert plan.target.exit_layer == 4  # inside dev1's layers 3-5
        for prompt, ref in reference.items():
            assert plan.generate(prompt, 24, mode="mirror").tokens == ref


def test_a_spread_model_on_an_onnxruntime_device_is_rejected(folders):
    target, draft, _ = folders
    bad = SPLIT_MAP.replace("dev2: {backend: torch, device: cpu, threads: 1}",
                            "dev2: {backend: onnxruntime}")  # fmt: skip
    with pytest.raises(PlacementError, match="runs whole models"):
        api.compile(target, draft, bad, max_len=128)


def test_a_spread_model_with_two_dtypes_is_rejected(folders):
    target, draft, _ = folders
    bad = SPLIT_MAP.replace("dev1: {backend: torch, device: cpu, threads: 1}",
                            "dev1: {backend: torch, device: cpu, dtype: bfloat16}")  # fmt: skip
    with pytest.raises(DeviceMapError, match=r"same `dtype:`"):
        api.compile(target, draft, bad, max_len=128)


def test_sampling_on_a_spread_plan_equals_the_single_device_plan_draw_for_draw(folders):
    """Every stage's arithmetic is the single-device model's, so with one seed a sampled
    generation is the same sequence of draws (stronger than a χ² test of the distribution)."""
    target, draft, _ = folders
    one = SPLIT_MAP.split("placement:")[0] + "placement: {target: dev0, draft: dev1}\n"
    one += "speculation: {exit_layer: 2, branch_budget: 4, mode: mirror}\n"
    kw = dict(temperature=1.0, top_p=0.9)
    with api.compile(target, draft, one, max_len=128) as plan:
        ref = [plan.generate("w1 w2", 24, seed=s, **kw).tokens for s in range(4)]
    with api.compile(target, draft, SPLIT_MAP, max_len=128) as plan:
        got = [plan.generate("w1 w2", 24, seed=s, **kw).tokens for s in range(4)]
    assert got == ref
    assert len({tuple(t) for t in ref}) > 1  # the seeds do sample different sequences


def test_a_saved_spread_plan_loads_and_decodes_the_same(folders, reference, tmp_path):
    target, draft, _ = folders
    ranged = SPLIT_MAP.replace(
        "  target.layers.3: dev1\n  target.layers.4: dev1\n  target.layers.5: dev1\n",
        "  target.layers.[3-6): dev1\n",
    )
    with api.compile(target, draft, ranged, max_len=128) as plan:
        assert plan.target_device.alias == "dev0+dev1+dev2"
        api.save(plan, tmp_path / "plan")
    with api.load(tmp_path / "plan") as again:
        assert isinstance(again.target, PipelineRunner)
        for prompt, ref in reference.items():
            assert again.generate(prompt, 24, mode="mirror").tokens == ref


def test_a_batch_on_a_spread_plan_equals_batch_1(folders, reference):
    target, draft, _ = folders
    with api.compile(target, draft, SPLIT_MAP, max_len=256) as plan:
        for mode in ("speculative", "mirror"):
            results = plan.generate(list(reference), 24, mode=mode)
            assert [r.tokens for r in results] == list(reference.values()), mode


def test_describe_names_every_device_of_a_spread_stage_group(folders):
    target, draft, _ = folders
    with api.compile(target, draft, SPLIT_MAP, max_len=128) as plan:
        lines = api.describe(plan).splitlines()[1:6]
    rows = dict(re.split(r"\s{2,}", line)[:2] for line in lines)
    assert rows["target.layers.[0-2) prefix"] == "dev0"
    assert rows["target.layers.[2-6) suffix"] == "dev0+dev1"
    assert rows["target.norm + lm_head (+ exit head)"] == "dev1+dev2"
    assert rows["draft (all stages)"] == "dev1+dev2"
