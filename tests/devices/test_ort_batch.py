"""Batches on ONNX Runtime: the target split on ORT (`OrtSplitRunner`) and the draft on ORT
(`OrtRunner`) run packed batches through their batch-1 graphs and in-place KV buffers; every
sequence equals its batch-1 output and the torch target's greedy decoding."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.devices.ort_core import OrtDevice
from mirror_sd.devices.ort_device import OrtRunner
from mirror_sd.devices.ort_split import OrtSplitRunner
from mirror_sd.graphs import load_model
from mirror_sd.graphs.export import export_cached, source_identity
from mirror_sd.partition.spec_config import SpecConfig
from mirror_sd.runtime.autoregressive import greedy_decode
from mirror_sd.runtime.plan import DeviceSlot, Plan
from tests.conftest import make_tiny, save_tiny
from tests.runtime.conftest import IdTokenizer
from tests.runtime.test_batch import assert_same

CPU = OrtDevice(intra_op_threads=1)
MAX_LEN = 512  # mirror holds (1 + budget)·(γ + 1) + 1 rows per sequence beyond its tokens


@pytest.fixture(scope="module", params=[None, True], ids=["host-kv", "ortvalue-kv"])
def ort_plan(request, tmp_path_factory):
    """A plan with both models on ORT; `ortvalue-kv` forces the device-memory KV buffers,
    whose compaction is a device copy per row."""
    root = tmp_path_factory.mktemp("ort-batch")
    t_folder = save_tiny(make_tiny("qwen2", seed=0, num_hidden_layers=3), root / "t")
    d_folder = save_tiny(make_tiny("qwen2", seed=1, num_hidden_layers=1), root / "d")
    target, draft = load_model(t_folder), load_model(d_folder)
    cache = tmp_path_factory.getbasetemp() / "onnx-batch-cache"
    d_path = export_cached(draft, cache, source_identity(d_folder))
    plan = Plan(
        target=OrtSplitRunner(
            target, source_identity(t_folder), cache, 1, MAX_LEN, CPU, kv_on_device=request.param
        ),
        target_device=DeviceSlot("cpu", CPU.describe()),
        draft=OrtRunner(d_path, CPU, MAX_LEN, name="draft", kv_on_device=request.param),
        draft_device=DeviceSlot("npu", CPU.describe()),
        tokenizer=IdTokenizer(),
        spec=SpecConfig(exit_layer=1, max_len=MAX_LEN, branch_budget=8, num_draft_tokens=3),
    )
    yield plan, target
    plan.close()


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("mode", ["autoregressive", "speculative", "mirror"])
def test_ort_batch_equals_batch1(ort_plan, mode, size):
    plan, target = ort_plan
    prompts = [_prompt(s, n) for s, n in zip(range(size), (6, 2, 13, 1, 9), strict=False)]
    results = plan.generate(prompts, 16, mode=mode)
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        single = plan.generate(prompt, 16, mode=mode).tokens
        assert_same(target, prompt, res.tokens, single, f"ort {mode} B={size} prompts[{i}]")
        assert_same(target, prompt, res.tokens, greedy_decode(target, prompt, 16), "greedy")
    if mode == "speculative" and size == 5:
        assert results[0].batch.compactions > 0  # a random draft leaves holes to squeeze out
