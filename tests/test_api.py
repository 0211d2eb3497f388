"""compile() / save() / load() / describe() end to end on tiny models with an ORT draft."""

import json
import warnings
from pathlib import Path

import pytest

import mirror_sd.api as api
from mirror_sd.devices.cpu_caps import host_caps
from mirror_sd.devices.ort_core import ProviderUnavailableError
from mirror_sd.runtime.prompts import PromptTooLongError
from tests.conftest import TORCH_DRAFT_MAP, make_tiny, save_tiny_with_tokenizer, tiny_pair

CUDA_DRAFT_MAP = """
version: 1
devices:
  a: {backend: torch, device: cpu}
  gpu:
    backend: onnxruntime
    providers: [CUDAExecutionProvider: {}]
placement: {target: a, draft: gpu}
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_pair(root)


@pytest.fixture(scope="module")
def plan(folders):
    target, draft, root = folders
    with api.compile(target, draft, onnx_dir=root / "onnx", max_len=256) as p:
        yield p


def test_compiled_plan_is_lossless_in_every_mode(plan):
    prompt = "w1 w2 w3 w4 w5"
    ref = plan.generate(prompt, 24, mode="autoregressive")
    for mode in ("speculative", "mirror"):
        res = plan.generate(prompt, 24, mode=mode)
        assert res.tokens == ref.tokens, mode
        assert res.stats.draft_device == "onnxruntime CPUExecutionProvider"
    assert ref.prompt_tokens > 5  # the chat template was applied


def test_prefix_cache_keeps_chat_turns_identical_on_the_default_map(plan):
    """The default map's ONNX Runtime target (int4 where the CPU runs it: a padded one-row
    step on AVX2) and draft with `prefix_cache`: each turn resends the history, reuses the
    last turn's rows, and gives the tokens a fresh prefill gives, in every mode."""
    for mode in ("autoregressive", "speculative", "mirror"):
        out = {}
        for on in (False, True):
            prompt, turns = [5, 6, 7, 8, 9], []
            for turn in range(3):
                res = plan.generate(prompt, 10, mode=mode, prefix_cache=on)
                turns.append(res.tokens)
                prompt = prompt + res.tokens + [30 + turn]
                assert (res.stats.prompt_rows_reused > 0) == (on and turn > 0), (mode, turn)
            out[on] = turns
        assert out[True] == out[False], mode


def test_auto_settings_were_chosen_and_explained(plan):
    assert isinstance(plan.spec.exit_layer, int) and isinstance(plan.spec.branch_budget, int)
    text = api.describe(plan)
    assert "EP actually used" in text and "CPUExecutionProvider" in text
    assert "chosen: exit_layer" in text and "cut edge" in text


def test_save_load_round_trip(plan, tmp_path):
    api.save(plan, tmp_path / "plan")
    assert {p.name for p in (tmp_path / "plan").iterdir()} >= {
        "plan.yaml",
        "graph.json",
        "onnx",
        "profile.json",
    }
    with api.load(tmp_path / "plan") as again:
        assert again.spec == plan.spec
        assert again.report.graph == plan.report.graph
        assert again.report.placement == plan.report.placement
        prompt = [5, 6, 7, 8]
        assert again.generate(prompt, 16).tokens == plan.generate(prompt, 16).tokens


def test_torch_draft_device_map(folders):
    target, draft, _ = folders
    with api.compile(
        target, draft, TORCH_DRAFT_MAP, exit_layer=3, branch_budget=4, max_len=128
    ) as p:
        assert p.spec.exit_layer == 3 and "torch cpu" in p.draft_device.label
        a = p.generate("w3 w4", 12)
        assert a.tokens == p.generate("w3 w4", 12, mode="autoregressive").tokens


def test_tokenizer_mismatch_is_rejected(folders, tmp_path):
    target, _, _ = folders
    other = save_tiny_with_tokenizer(
        make_tiny("qwen2", seed=2, num_hidden_layers=2, vocab_size=90), tmp_path / "o"
    )
    with pytest.raises(api.TokenizerMismatchError, match="different tokenizer"):
        api.compile(target, other)


def test_missing_execution_provider_lists_available(folders):
    target, draft, _ = folders
    with pytest.raises(
        ProviderUnavailableError,
        match="CUDAExecutionProvider is not available.*available: .*CPUExecutionProvider",
    ):
        api.compile(target, draft, CUDA_DRAFT_MAP, exit_layer=3, branch_budget=4)


def test_prompt_longer_than_context(plan):
    with pytest.raises(PromptTooLongError, match="exceeds the context of 256"):
        plan.generate(list(range(5, 90)) * 3, 8)


ORT_TARGET_MAP = """
version: 1
devices:
  tgt: {backend: onnxruntime, providers: [CPUExecutionProvider: {}], intra_op_threads: 1}
  drf: {backend: onnxruntime, providers: [CPUExecutionProvider: {}], intra_op_threads: 1}
placement: {target: tgt, draft: drf}
"""


def test_target_on_onnxruntime_split_at_the_chosen_exit_layer(folders):
    """The target as exported prefix / exit head / suffix graphs; `auto` re-exports the split
    the cost model picks. Every mode stays identical to target-only decoding."""
    target, draft, root = folders
    with api.compile(target, draft, ORT_TARGET_MAP, onnx_dir=root / "onnx", max_len=256) as p:
        assert p.target_device.label == "onnxruntime CPUExecutionProvider"
        assert p.target.exit_layer == p.spec.exit_layer
        prompt = "w7 w8 w9"
        ref = p.generate(prompt, 16, mode="autoregressive").tokens
        for mode in ("speculative", "mirror"):
            assert p.generate(prompt, 16, mode=mode).tokens == ref
        with pytest.raises(ValueError, match="recompile the plan"):
            p.generate(prompt, 4, exit_layer=p.spec.exit_layer % 5 + 1)


def assert_modes_match_ar(p, quant: str, trees_and_batches: bool) -> None:
    """Every mode's greedy tokens equal the plan's own `ar` on two prompts; with
    `trees_and_batches` also sibling token trees and packed batches of both prompts (exact on
    ONNX Runtime targets at any weight format: the graphs regroup rows, docs/runtime.md)."""
    prompts, refs = ("w7 w8 w9", "w3 w1 w4 w1 w5"), []
    for prompt in prompts:
        ref = p.generate(prompt, 16, mode="autoregressive").tokens
        for mode in ("speculative", "mirror"):
            assert p.generate(prompt, 16, mode=mode).tokens == ref, (quant, mode)
        if trees_and_batches:
            tree = p.generate(prompt, 16, mode="speculative", tree_siblings=2).tokens
            assert tree == ref, (quant, "tree")
        refs.append(ref)
    if trees_and_batches:
        for mode in ("autoregressive", "speculative", "mirror"):
            batch = p.generate(list(prompts), 16, mode=mode)
            assert [r.tokens for r in batch] == refs, (quant, mode, "batch")


@pytest.mark.parametrize("quant", ["int8", "int4", "int8-rows"])
def test_quantized_target_is_lossless_against_its_own_decoding(folders, quant):
    """`quantize` on the target's device: the quantized target is the plan's reference; every
    mode equals its own greedy decoding (the plan's `ar`), and describe() says so."""
    target, draft, root = folders
    text = ORT_TARGET_MAP.replace(
        "tgt: {backend: onnxruntime,", f"tgt: {{backend: onnxruntime, quantize: {quant},"
    )
    with api.compile(target, draft, text, onnx_dir=root / "onnx", max_len=256) as p:
        assert p.target.quantize == quant
        assert f"{quant} weights" in p.target_device.label
        assert f"reference: the {quant}-weight target" in api.describe(p)
        assert_modes_match_ar(p, quant, trees_and_batches=True)


def test_a_draft_prefilled_on_a_second_graph_stays_lossless(folders):
    """`prefill_quantize` on the draft's device: its prompt runs through the int8-rows export,
    its steps through the int4 one, sharing one cache; every mode still equals `ar`."""
    from mirror_sd.devices.ort_device import FILL_GRAPH_ROWS

    target, draft, root = folders
    text = ORT_TARGET_MAP.replace(
        "drf: {backend: onnxruntime,",
        "drf: {backend: onnxruntime, quantize: int4, prefill_quantize: int8-rows,",
    )
    prompt = " ".join(f"w{i % 10}" for i in range(FILL_GRAPH_ROWS + 8))  # a fill on the graph
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        p = api.compile(target, draft, text, onnx_dir=root / "onnx", max_len=256)
    saturating = [w for w in seen if "devices.drf.prefill_quantize: int8-rows" in str(w.message)]
    assert len(saturating) == (0 if host_caps().u8s8_exact else 1)  # pinned where it saturates
    with p:
        assert "prompts prefilled with int8-rows weights" in p.draft_device.label
        ref = p.generate(prompt, 16, mode="autoregressive").tokens
        for mode in ("speculative", "mirror"):
            assert p.generate(prompt, 16, mode=mode).tokens == ref, mode
        assert_modes_match_ar(p, "none", trees_and_batches=False)
        api.save(p, root / "prefilled-plan")
        saved = {d.name for d in (root / "prefilled-plan" / "onnx").iterdir()}
        assert {p.draft.fill_graph.parent.name, Path(p.report.onnx).parent.name} <= saved
    with api.load(root / "prefilled-plan") as again:  # the saved plan keeps its second graph
        assert "prompts prefilled with int8-rows weights" in again.draft_device.label
        assert again.generate(prompt, 16, mode="speculative").tokens == ref


def test_prefill_quantize_on_the_target_device_is_a_clear_error(folders):
    target, draft, root = folders
    text = ORT_TARGET_MAP.replace(
        "tgt: {backend: onnxruntime,", "tgt: {backend: onnxruntime, prefill_quantize: int8,"
    )
    with pytest.raises(ValueError, match=r"devices\.tgt\.prefill_quantize.*draft's device"):
        api.compile(target, draft, text, onnx_dir=root / "onnx", max_len=256)


def test_quantize_auto_keeps_a_4_bit_checkpoint_4_bit_where_the_cpu_has_int8_kernels(
    folders, monkeypatch
):
    """`quantize: auto` on a folder fetched from a Q4_K_M GGUF: int4 weights on a CPU with
    integer dot-product kernels (mocked: AMX), int8-rows with AVX512-VNNI, int7-rows with AVX2
    alone, fp32 on one
    without; describe() says which and why, the plan's reference is that target, and
    speculative equals its `ar`."""
    from mirror_sd import builders
    from mirror_sd.partition.precision import CpuCaps

    target, draft, root = folders
    marker = target / "mirror_sd_fetch.json"
    marker.write_text(json.dumps({"gguf_file": "tiny-q4_k_m.gguf"}))
    text = ORT_TARGET_MAP.replace(
        "tgt: {backend: onnxruntime,", "tgt: {backend: onnxruntime, quantize: auto,"
    )
    try:
        for flags, expected in (
            ({"avx2", "amx_int8"}, "int4"),
            ({"avx2", "avx512_vnni"}, "int8-rows"),  # a target where the u8s8 GEMM is faster
            ({"avx2"}, "int7-rows"),  # the same GEMM without VNNI: weights it computes exactly
            ({"sse4_2"}, "none"),
        ):
            monkeypatch.setattr(
                builders, "host_caps", lambda f=flags: CpuCaps("mock", frozenset(f))
            )
            with api.compile(target, draft, text, onnx_dir=root / "onnx", max_len=256) as p:
                assert p.device_specs[0].quantize == expected
                described = api.describe(p)
                assert f"quantize: auto -> {expected} (the checkpoint is int4" in described
                if expected != "none":
                    assert f"reference: the {expected}-weight target" in described
                    ref = p.generate("w7 w8 w9", 12, mode="autoregressive").tokens
                    assert p.generate("w7 w8 w9", 12, mode="speculative").tokens == ref
    finally:
        marker.unlink()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_weight_only_torch_target_is_lossless_against_its_own_decoding(folders, quant):
    """torch target with int8 / int4 weight-only linears and bf16 activations: every mode
    equals the plan's own `ar` (its rows are bit-for-bit row-invariant), greedy."""
    target, draft, root = folders
    text = TORCH_DRAFT_MAP.replace(
        "a: {backend: torch, device: cpu, threads: 1}",
        f"a: {{backend: torch, device: cpu, threads: 1, dtype: bfloat16, quantize: {quant}}}",
    )
    with api.compile(target, draft, text, onnx_dir=root / "onnx", max_len=256) as p:
        assert f"{quant} weights" in p.target_device.label
        assert f"reference: the {quant}-weight target" in api.describe(p)
        assert_modes_match_ar(p, quant, trees_and_batches=False)


SHIPPED_MAPS = [
    *sorted(Path(__file__).parents[1].joinpath("examples", "device_maps").glob("*.yaml")),
    Path(api.__file__).parent / "device_maps" / "default.yaml",
]


def _runs_here(spec) -> bool:
    """Whether this machine has the map entry's device (the CPU maps; not cuda, mps, NPUs)."""
    if isinstance(spec, api.TorchSpec):
        return spec.device == "cpu"
    return spec.providers[0][0] == "CPUExecutionProvider"


@pytest.mark.parametrize("map_file", SHIPPED_MAPS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_target_only_on_every_shipped_map(folders, map_file):
    """No draft: the map's `draft` placement and its draft-only device are ignored, not a
    PlacementError; where the target's device exists here, the plan generates target-only."""
    target, _, root = folders
    dm = api.load_device_map(map_file)
    assert "draft" in dm.placement  # every shipped map places a draft
    if not _runs_here(dm.devices[dm.placement["target"]]):
        try:  # no CUDA / MPS here: the target's device is missing, but the map was accepted
            api.compile(target, None, map_file, onnx_dir=root / "onnx", max_len=256).close()
        except Exception as exc:  # anything but a map error
            assert not isinstance(exc, api.DeviceMapError), exc
        return
    with api.compile(target, None, map_file, onnx_dir=root / "onnx", max_len=256) as p:
        assert p.draft is None and p.draft_device is None
        saved = p.report.device_map
        assert set(saved["placement"]) == {"target"}
        assert set(saved["devices"]) == {dm.placement["target"]}  # draft-only device dropped
        res = p.generate("w1 w2 w3", 6)
        assert len(res.tokens) == 6 and res.stats.mode == "autoregressive"
