"""The CUDA path: a torch target on cuda:0 with an ONNX Runtime CPU draft, compiled from a
device map, is lossless in every mode, greedy (float32, bfloat16, float16) and sampled.

Skipped without a CUDA GPU (CI has none); `make gpu-check` runs these on a GPU machine
(docs/gpu_check.md).
"""

from pathlib import Path

import pytest
import torch

import mirror_sd.api as api
from mirror_sd.graphs.loader import load_model
from mirror_sd.runtime.autoregressive import extend
from tests.conftest import make_tiny, save_tiny_with_tokenizer, tiny_pair
from tests.runtime.conftest import CHI2_99_9, chi2, target_dists

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]

CUDA_ORT_MAP = """
version: 1
devices:
  gpu: {backend: torch, device: cuda:0, dtype: float32}
  cpu:
    backend: onnxruntime
    providers: [CPUExecutionProvider: {}]
    quantize: int8
placement: {target: gpu, draft: cpu}
"""
PROMPTS = ([5, 6, 7, 8, 9], [40, 3, 77, 12])
# A bf16 / fp16 target verifying γ+1 rows at once may round differently from one row at a
# time (other GPU kernels): greedy choices may then differ where two logits tie to within
# this fraction of the largest |logit|. Anything further apart is a bug.
TIE_TOLERANCE = {"float32": 0.0, "bfloat16": 2**-5, "float16": 2**-8}


def cuda_map(dtype: str) -> dict:
    """The map above as a dict, the target in `dtype`."""
    return {
        "version": 1,
        "devices": {
            "gpu": {"backend": "torch", "device": "cuda:0", "dtype": dtype},
            "cpu": {"backend": "onnxruntime", "providers": [{"CPUExecutionProvider": {}}]},
        },
        "placement": {"target": "gpu", "draft": "cpu"},
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


def check_lossless(folder: Path, dtype: str, prompt: list[int], ref: list[int], got: list[int]):
    """`got` equals the target's greedy `ref`, or first differs at a tie of two logits (within
    TIE_TOLERANCE[dtype]) of the target in `dtype`; returns the divergence index or None."""
    i = next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), None)
    if i is None:
        return None
    model = load_model(folder, dtype).to("cuda")
    logits = extend(model, model.new_cache(len(prompt) + i + 1), prompt + ref[:i])[-1].float()
    gap = float(logits[ref[i]] - logits[got[i]])
    bound = TIE_TOLERANCE[dtype] * float(logits.abs().max())
    assert abs(gap) <= bound, (
        f"{dtype}: token {i} differs from the target's greedy choice ({got[i]} vs {ref[i]}), "
        f"logit gap {gap:.4f} > tie bound {bound:.4f}: not a rounding tie"
    )
    return i


def test_greedy_lossless_fp32_yaml_map(folders):
    """compile() from YAML: torch float32 target on cuda:0, int8 ORT CPU draft; ℓe and the
    branch budget profiled on the GPU; speculative and mirror equal target-only greedy."""
    target, draft, root = folders
    with api.compile(target, draft, CUDA_ORT_MAP, onnx_dir=root / "onnx", max_len=256) as p:
        assert p.target_device.label.startswith("torch cuda:0 float32")
        assert p.report.profile.t_target[1] > 0 and isinstance(p.spec.exit_layer, int)
        for prompt in PROMPTS:
            ref = p.generate(prompt, 24, mode="autoregressive", eos_token_id=[])
            for mode in ("speculative", "mirror"):
                res = p.generate(prompt, 24, mode=mode, eos_token_id=[])
                assert res.tokens == ref.tokens, (mode, prompt)
                assert res.stats.draft_device == "onnxruntime CPUExecutionProvider"
                assert res.stats.fallback is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_greedy_lossless_half_precision(folders, dtype):
    """A bf16 / fp16 target is the reference for its own plan: every mode equals its greedy
    decoding (up to rounding ties, see TIE_TOLERANCE)."""
    target, draft, root = folders
    with api.compile(
        target, draft, cuda_map(dtype), onnx_dir=root / "onnx", max_len=256, exit_layer=3,
        branch_budget=8,
    ) as p:  # fmt: skip
        assert f"reference: the {dtype} target" in api.describe(p)
        ties = []
        for prompt in PROMPTS:
            ref = p.generate(prompt, 24, mode="autoregressive", eos_token_id=[]).tokens
            for mode in ("speculative", "mirror"):
                got = p.generate(prompt, 24, mode=mode, eos_token_id=[]).tokens
                ties.append(check_lossless(target, dtype, prompt, ref, got))
        assert sum(t is not None for t in ties) <= len(ties) // 2, f"too many ties: {ties}"


def test_shipped_cuda_map_runs_the_target(folders):
    """examples/device_maps/cuda_ortcuda.yaml without a draft: its bf16 cuda:0 target runs
    (the ORT CUDA draft device is dropped, so a CPU-only onnxruntime is fine)."""
    target, _, root = folders
    map_file = Path(__file__).parents[1] / "examples" / "device_maps" / "cuda_ortcuda.yaml"
    with api.compile(target, None, map_file, onnx_dir=root / "onnx", max_len=256) as p:
        assert p.target_device.label.startswith("torch cuda:0 bfloat16")
        assert len(p.generate([5, 6, 7], 8, eos_token_id=[]).tokens) == 8


def test_mirror_sampling_matches_target_distribution_on_cuda(tmp_path):
    """tests/runtime/test_lossless_sampling.py with the target on cuda:0 and the draft in
    ONNX Runtime: sampled tokens follow the target's law (χ², 99.9%), reused branches included."""
    v = 6  # make_tokenizer(6): 5 special tokens + 1 word
    small = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    t_model = make_tiny("llama", seed=0, num_hidden_layers=3, **small)
    d_model = make_tiny("llama", seed=9, num_hidden_layers=1, **small)
    target = save_tiny_with_tokenizer(t_model, tmp_path / "t")
    draft = save_tiny_with_tokenizer(d_model, tmp_path / "d")
    prompt, n = [1, 2, 3], 1500
    with api.compile(
        target, draft, cuda_map("float32"), onnx_dir=tmp_path / "onnx", mode="mirror",
        num_draft_tokens=2, exit_layer=2, exit_top_k=v, branch_budget=3 * v, temperature=1.0,
        max_len=64,
    ) as p:  # fmt: skip
        pairs = torch.zeros(v, v, dtype=torch.double)
        thirds = torch.zeros(v, dtype=torch.double)
        reused = 0
        for seed in range(n):
            res = p.generate(prompt, 3, seed=seed, eos_token_id=[])
            a, b, c = res.tokens
            pairs[a, b] += 1
            thirds[c] += 1
            reused += sum(r.hit is True for r in res.rounds[:-1])
    assert reused > n // 10, "the test must exercise rounds that reuse a branch"
    joint, third = target_dists(load_model(target), prompt, v)
    assert chi2(pairs.flatten(), joint.flatten()) < CHI2_99_9[35]
    assert chi2(thirds, third) < CHI2_99_9[5]
    d_joint, _ = target_dists(load_model(draft), prompt, v)  # power: the draft's law differs
    assert chi2(pairs.flatten(), d_joint.flatten()) > CHI2_99_9[35]
