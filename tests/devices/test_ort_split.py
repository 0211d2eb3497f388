"""OrtSplitRunner: a target split at ℓe on ONNX Runtime that equals TorchRunner step by step.

Each family's tiny model (3 layers, ℓe = 1) is exported once per module (prefix, suffix and
head graphs through the export cache; the plan test reuses qwen2's); every check compares logits / hidden states with `TorchRunner` on the same
model (prefill, a mirror round's prefix + exit head + suffix, rollback, tree rows, keep), and a
plan with the ORT target decodes exactly like the torch target in every mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from mirror_sd.devices.base import SplitRunner
from mirror_sd.devices.ort_core import OrtDevice
from mirror_sd.devices.ort_split import OrtSplitRunner
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.graphs import load_model
from mirror_sd.graphs.export import graph_feeds, source_identity
from mirror_sd.graphs.kv_cache import CacheFullError
from mirror_sd.graphs.masks import causal_mask, tree_mask
from mirror_sd.graphs.model import CausalLM
from mirror_sd.partition.device_map import OrtSpec, TorchSpec
from mirror_sd.partition.spec_config import SpecConfig
from mirror_sd.runtime.autoregressive import greedy_decode, positions
from mirror_sd.runtime.plan import DeviceSlot, Plan
from tests.conftest import make_tiny, save_tiny
from tests.runtime.conftest import IdTokenizer, tiny_model

CPU = OrtDevice(intra_op_threads=1)
TOL = 1e-4
LAYERS, EXIT = 3, 1  # the tiny targets: the prefix runs layer 0, the suffix layers 1 and 2


class Target(NamedTuple):
    model: CausalLM
    key: dict  # the weights' identity (export.source_identity)
    cache: Path  # the export cache folder


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def target(request, tmp_path_factory) -> Target:
    """A tiny target per family, exported once (prefix, suffix and head graphs)."""
    model = make_tiny(request.param, num_hidden_layers=LAYERS)
    folder = save_tiny(model, tmp_path_factory.mktemp(request.param))
    cache = tmp_path_factory.getbasetemp() / "onnx-split-cache"
    target = Target(load_model(folder), source_identity(folder), cache)
    runner(target)  # export now, so that test durations show the checks
    return target


def runner(target: Target, max_len: int = 32, exit_layer: int = EXIT, **kw) -> OrtSplitRunner:
    return OrtSplitRunner(*target, exit_layer, max_len, CPU, alias="cpu", **kw)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


class Pair:
    """An OrtSplitRunner and a TorchRunner fed the same steps; each step checks they agree."""

    def __init__(self, target: Target, max_len: int = 32, kv_on_device: bool | None = None):
        self.ort = runner(target, max_len, kv_on_device=kv_on_device)
        self.torch = TorchRunner(target.model, TorchDevice(), max_len, exit_layer=EXIT)

    def forward(self, ids, pos=None, mask=None):
        pos, mask, t = self._inputs(ids, pos, mask)
        close(self.ort.forward(t, pos, mask), self.torch.forward(t, pos, mask))
        assert self.ort.length == self.torch.length

    def split(self, ids, pos=None, mask=None):
        """A mirror round's target side: prefix, exit head, suffix."""
        pos, mask, t = self._inputs(ids, pos, mask)
        n = self.ort.length
        h_ort, h_torch = (
            self.ort.forward_prefix(t, pos, mask),
            self.torch.forward_prefix(t, pos, mask),
        )
        close(h_ort, h_torch)  # (1, T, D)
        assert self.ort.length == n  # the prefix does not advance
        close(self.ort.exit_logits(h_ort), self.torch.exit_logits(h_torch))
        close(
            self.ort.forward_suffix(h_ort, pos, mask), self.torch.forward_suffix(h_torch, pos, mask)
        )
        assert self.ort.length == self.torch.length == n + len(ids)

    def apply(self, method, *args):
        getattr(self.ort, method)(*args)
        getattr(self.torch, method)(*args)
        assert self.ort.length == self.torch.length

    def _inputs(self, ids, pos, mask):
        n, t = self.ort.length, len(ids)
        pos = positions(n, t) if pos is None else pos
        mask = causal_mask(n, t) if mask is None else mask
        return pos, mask, torch.tensor([ids])


def rounds(pair: Pair) -> None:
    """Prefill, mirror and plain rounds, rollback, tree rows and keep, checked step by step."""
    assert isinstance(pair.ort, SplitRunner)
    pair.forward([3, 1, 4, 1, 5, 9])  # S = 0 prefill
    pair.split([2, 6, 5, 3])  # a mirror round: x_n and γ = 3 draft tokens
    pair.apply("rollback", 8)  # two accepted: keep x_n, d_1
    pair.split([7, 8, 9])
    pair.forward([4])  # a plain round
    n = pair.ort.length  # branches (11, 12), (21, 22) and (31,) as tree rows
    depth = torch.tensor([[0, 1, 0, 1, 0]])
    pair.split([11, 12, 21, 22, 31], n + depth, tree_mask(n, [-1, 0, -1, 2, -1]))
    pair.apply("keep", n, [n + 2, n + 3])  # branch (21, 22) wins, in every layer
    pair.split([5, 5])
    pair.apply("keep", n, [n, n + 1])  # the contiguous prefix: a length change only
    pair.forward([4, 4, 4])


def test_split_runner_equals_torch_through_rounds(target):
    rounds(Pair(target))


@pytest.mark.parametrize("target", ["qwen3"], indirect=True)
def test_ortvalue_kv_equals_torch(target):
    """The OrtValue cache of CUDA / DirectML targets, forced on the CPU provider."""
    pair = Pair(target, kv_on_device=True)
    assert not isinstance(pair.ort.kv.k, np.ndarray)
    rounds(pair)


def test_prefix_rows_are_overwritten_by_the_next_block(target):
    """A prefix whose suffix never ran leaves no trace: its rows lie past `length`."""
    pair = Pair(target)
    pair.forward([1, 2, 3])
    ids = torch.tensor([[9, 9]])
    pair.ort.forward_prefix(ids, positions(3, 2), causal_mask(3, 2))
    pair.split([4, 5])


def test_exit_layer_is_fixed_by_the_graphs(target):
    r = runner(target)
    r.exit_layer = EXIT  # what Plan does with an explicit ℓe: the same value is fine
    with pytest.raises(ValueError, match="recompile the plan with exit_layer=2"):
        r.exit_layer = 2
    assert r.exit_layer == EXIT
    assert r.name == f"target on cpu ({CPU.describe()})"
    assert r.placement.startswith("CPUExecutionProvider:")
    with pytest.raises(ValueError, match="outside"):
        runner(target, exit_layer=LAYERS)
    assert runner(target).graphs == r.graphs  # the same ℓe: the same cached exports


def test_cached_exports_need_no_weights(target):
    """With the graphs cached, a weightless (meta-device) model is enough to build a runner."""
    with torch.device("meta"):
        meta = CausalLM(target.model.config)
    pair = Pair(target)
    pair.ort = OrtSplitRunner(meta, target.key, target.cache, EXIT, 32, CPU)
    assert pair.ort.graphs == runner(target).graphs
    pair.split([1, 2, 3])


def test_cache_full_and_bad_mask(target):
    r = runner(target, max_len=4)
    with pytest.raises(CacheFullError, match="max_len"):
        r.forward(torch.zeros(1, 5, dtype=torch.long), positions(0, 5), causal_mask(0, 5))
    with pytest.raises(ValueError, match="mask shape"):
        r.forward_prefix(torch.zeros(1, 2, dtype=torch.long), positions(0, 2), causal_mask(1, 2))
    assert r.length == 0


@pytest.mark.parametrize("target", ["qwen2"], indirect=True)  # qwen2's exports, reused
def test_plan_with_ort_target_equals_greedy(target, tmp_path):
    """Every mode of a plan whose target runs on ORT decodes exactly like the torch target."""
    draft = tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)
    plan = Plan(
        target=runner(target, max_len=256),
        target_device=DeviceSlot("cpu", CPU.describe()),
        draft=TorchRunner(draft, TorchDevice(), 256, name="draft"),
        draft_device=DeviceSlot("npu", "torch cpu"),
        tokenizer=IdTokenizer(),
        spec=SpecConfig(exit_layer=EXIT, max_len=256, branch_budget=8, num_draft_tokens=3),
    )
    try:
        for prompt in ([5, 17, 3, 88, 41], [2, 2, 60, 9, 13, 71, 4]):
            ref = greedy_decode(target.model, prompt, 20)
            for mode in ("mirror", "speculative", "autoregressive"):
                assert plan.generate(prompt, 20, mode=mode).tokens == ref, mode
    finally:
        plan.close()


class _Recording(OrtSplitRunner):
    """Records (stage, the stage session's intra-op threads) at every call."""

    log: list

    def _run_prefix(self, ids, position_ids, mask):
        self.log.append(("prefix", self.prefix.get_session_options().intra_op_num_threads))
        return super()._run_prefix(ids, position_ids, mask)

    def _run_suffix(self, hidden, position_ids, mask):
        self.log.append(("suffix", self.suffix.get_session_options().intra_op_num_threads))
        return super()._run_suffix(hidden, position_ids, mask)


class _RecordingDraft(TorchRunner):
    log: list

    def forward(self, ids, position_ids, mask):
        self.log.append(("draft", self.threads))
        return super().forward(ids, position_ids, mask)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a split needs two cores")
@pytest.mark.parametrize("target", ["qwen2"], indirect=True)  # qwen2's exports, reused
def test_thread_budget_per_phase(target, tmp_path):
    """Alone, each pipeline runs on every core; only mirror's suffix || rollouts split them."""
    cores = os.cpu_count()
    draft_model = tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)
    t = _Recording(*target, EXIT, 256, OrtDevice(intra_op_threads=cores, spinning=False))
    d = _RecordingDraft(draft_model, TorchDevice(threads=cores), 256, name="draft")
    t.log = d.log = log = []
    plan = Plan(
        target=t,
        target_device=DeviceSlot("cpu", "onnxruntime CPU"),
        draft=d,
        draft_device=DeviceSlot("cpu2", "torch cpu"),
        tokenizer=IdTokenizer(),
        spec=SpecConfig(
            exit_layer=EXIT,
            max_len=256,
            branch_budget=4,
            num_draft_tokens=3,
            overlap="split",
            overlap_target_cores=1,
        ),  # fmt: skip
        device_specs=(OrtSpec("cpu"), TorchSpec("cpu2", "cpu")),  # one physical CPU
    )
    try:
        ref = greedy_decode(target.model, [5, 17, 3, 88, 41], 12)
        assert plan.generate([5, 17, 3, 88, 41], 12, mode="mirror").tokens == ref
        assert ("prefix", cores) in log and ("suffix", cores) in log  # prefill: alone
        assert ("suffix", 1) in log  # overlapped with the rollouts
        assert ("draft", cores) in log and ("draft", cores - 1) in log  # chain / rollouts
        assert not any(s == "prefix" and n != cores for s, n in log)  # prefix: draft idle
        log.clear()
        assert plan.generate([5, 17, 3, 88, 41], 12, mode="speculative").tokens == ref
        assert {n for s, n in log if s in ("prefix", "suffix")} == {cores}
        assert {n for s, n in log if s == "draft"} == {cores}
        assert t.pools["suffix"].thread_counts == (cores, 1)
    finally:
        plan.close()


@pytest.mark.parametrize("target", ["qwen2"], indirect=True)  # qwen2's exports, reused
def test_fill_writes_the_same_rows_as_forward_without_logits(target):
    """A prefill needs no logits: fill() skips the head and leaves the same cache behind."""
    prompt, nxt = torch.tensor([[5, 17, 3, 88, 41, 9]]), torch.tensor([[13]])
    outs = []
    for r in (runner(target), TorchRunner(target.model, TorchDevice(), 32, exit_layer=EXIT)):
        for how in ("forward", "fill"):
            r.rollback(0)
            assert getattr(r, how)(prompt, positions(0, 6), causal_mask(0, 6)) is None or (
                how == "forward"
            )
            assert r.length == 6
            outs.append(r.forward(nxt, positions(6, 1), causal_mask(6, 1)))
    for out in outs[1:]:
        close(out, outs[0])


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("target", ["qwen2"], indirect=True)  # qwen2's exports, reused
def test_quantized_target_rows_do_not_depend_on_the_block(target, quant):
    """A quantized target scores a row bit for bit the same whether it is decoded alone or
    verified in a block (else speculative != its own ar): the split graphs are row-invariant
    (docs/runtime.md, *Row invariance*), through the runner's in-place KV buffers too."""
    r = runner(target, quantize=quant)
    assert f"-{quant}-" in r.graphs.prefix.parent.name and f"-{quant}-" in r.graphs.head.parent.name
    prompt, block = [5, 17, 3, 88], [41, 9, 13, 2, 60]
    r.fill(torch.tensor([prompt]), positions(0, 4), causal_mask(0, 4))
    together = r.forward(torch.tensor([block]), positions(4, 5), causal_mask(4, 5))  # (5, V)
    r.rollback(4)
    alone = torch.cat([
        r.forward(torch.tensor([[tok]]), positions(4 + i, 1), causal_mask(4 + i, 1))
        for i, tok in enumerate(block)
    ])  # fmt: skip
    assert torch.equal(alone, together)


def test_one_forward_regroups_its_mask_once_and_a_new_mask_afresh():
    """The prefix and the suffix of a forward share the mask: its grouped inputs are computed
    once (`_feeds`); any other mask gets its own, equal to `graph_feeds` of it."""
    runner = OrtSplitRunner.__new__(OrtSplitRunner)  # the method needs no sessions
    runner._last_feeds = None
    packed = causal_mask(4, 3)
    packed[0, 2, :2] = False  # the last row reads another key list: two groups
    first = runner._feeds(packed)
    assert runner._feeds(packed.clone()) is first  # same content: no second regrouping
    chain = runner._feeds(causal_mask(4, 3))
    assert chain is not first
    for feeds, mask in ((first, packed), (chain, causal_mask(4, 3))):
        want = graph_feeds(mask)
        assert feeds.keys() == want.keys()
        assert all(np.array_equal(feeds[k], want[k]) for k in want)
    assert first["key_index"].shape[0] == 2 and chain["key_index"].shape[0] == 1
