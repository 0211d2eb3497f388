"""What the families beyond Llama add (Gemma 3, Phi-3), the registry and the sliding-window mask.

The shared checks (logits and greedy generation equal to transformers', tree masks, rollback,
ONNX export, per-layer splits) run for every registered family through `tests.conftest`'s
FAMILIES; these are the settings the tiny defaults do not reach.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from mirror_sd.graphs import UnsupportedModelError, load_model
from mirror_sd.graphs.config import load_config
from mirror_sd.graphs.families import FAMILIES, SUPPORTED_ARCHITECTURES
from mirror_sd.graphs.heads import ExitHead
from mirror_sd.graphs.masks import causal_mask, sliding_window, tree_mask
from mirror_sd.runtime.autoregressive import extend, greedy_decode
from tests.conftest import TINY, TINY_FAMILY, make_tiny, save_tiny

DOCS = Path(__file__).parents[2] / "docs" / "models.md"


def logits_gap(hf, model, n: int = 23, seed: int = 1) -> float:
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    return (extend(model, model.new_cache(64), ids[0].tolist()) - ref).abs().max().item()


def test_docs_table_lists_every_registered_family():
    rows = re.findall(r"^\| [^|]+ \| `([a-z0-9_]+)` \|", DOCS.read_text(), re.M)
    assert sorted(set(rows) & set(FAMILIES)) == list(SUPPORTED_ARCHITECTURES)


def test_sliding_window_keeps_each_rows_most_recent_keys():
    m = sliding_window(causal_mask(2, 4), 3)  # rows at positions 2..5 over keys 0..5
    want = [[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert m[0].int().tolist() == want
    # a tree: rows a1 a2 b1 (parents -1 0 -1) over 3 cached keys; a2 sees k2, a1, itself
    t = sliding_window(tree_mask(3, [-1, 0, -1]), 3)[0].int().tolist()
    assert t == [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 1]]
    bias = torch.zeros(1, 4, 6).masked_fill(~causal_mask(2, 4), torch.finfo(torch.float32).min)
    assert torch.equal(sliding_window(bias, 3) == 0, m)  # additive masks narrow the same way


def test_gemma3_soft_capping_equals_transformers(tmp_path):
    """Final logits are capped; the attention cap is not, as in transformers (see gemma.py)."""
    caps = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    cfg = AutoConfig.for_model("gemma3_text", **{**TINY, **TINY_FAMILY["gemma3_text"], **caps})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # large enough that the caps bind
    model = load_model(save_tiny(hf, tmp_path / "g"))
    assert logits_gap(hf, model) <= 1e-4
    ids = torch.tensor([[5, 17, 3]])
    with torch.no_grad():
        assert model.head(torch.randn(1, 3, 64) * 50).abs().max() < 3.0
        ref = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert greedy_decode(model, [5, 17, 3], 12) == ref[0, 3:].tolist()


def test_gemma3_sliding_window_pattern_and_rope_bases(tmp_path):
    """Old configs give `sliding_window_pattern` (every n-th layer global) and
    `rope_local_base_freq` instead of layer_types and per-type rope_parameters."""
    extra = dict(head_dim=16, sliding_window=3, sliding_window_pattern=3, eos_token_id=None,
                 rope_local_base_freq=500.0, num_hidden_layers=5)  # fmt: skip
    hf = make_tiny("gemma3_text", **{**extra, "layer_types": None})
    model = load_model(save_tiny(hf, tmp_path / "g"))
    windows = [layer.self_attn.window for layer in model.model.layers]
    assert windows == [3, 3, None, 3, 3]
    assert model.inv_freq[1, 1].item() == pytest.approx(500.0 ** (-2 / 16))
    assert logits_gap(hf, model, n=20) <= 1e-4


def test_gemma3_embedding_norms_and_exit_head(tiny_gemma):
    """The embedding is scaled by sqrt(D) inside embed_tokens (every caller gets it), and the
    untrained exit head (logit lens) uses Gemma's (1 + w) final norm."""
    hf, model = tiny_gemma
    ids = torch.tensor([[3, 9]])
    with torch.no_grad():
        assert torch.allclose(model.embed(ids), hf.model.embed_tokens(ids))
        h = torch.randn(1, 2, 64)
        assert torch.allclose(ExitHead(model, 2)(h), model.head(h), atol=1e-5)


@pytest.fixture
def tiny_gemma(tmp_path):
    hf = make_tiny("gemma3_text")
    return hf, load_model(save_tiny(hf, tmp_path / "g"))


def test_phi3_fused_checkpoint_is_split_at_load(tmp_path):
    hf = make_tiny("phi3")
    folder = save_tiny(hf, tmp_path / "p")
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    model = load_model(folder)
    attn, mlp = hf.model.layers[0].self_attn, hf.model.layers[0].mlp
    ours = model.model.layers[0]
    fused = torch.cat([ours.self_attn.q_proj.weight, ours.self_attn.k_proj.weight,
                       ours.self_attn.v_proj.weight])  # fmt: skip
    assert torch.equal(fused, attn.qkv_proj.weight)
    assert torch.equal(torch.cat([ours.mlp.gate_proj.weight, ours.mlp.up_proj.weight]),
                       mlp.gate_up_proj.weight)  # fmt: skip
    assert ours.self_attn.rotary_dim == 8  # head_dim 16, partial_rotary_factor 0.5


def test_phi3_longrope_is_exact_within_its_original_context(tmp_path):
    # one factor per rotated pair: head_dim 16 with partial_rotary_factor 0.5 rotates 8 dims
    rope = dict(rope_type="longrope", short_factor=[1.0, 1.3, 1.7, 2.0],
                long_factor=[2.0, 3.0, 5.0, 8.0], original_max_position_embeddings=32)  # fmt: skip
    hf = make_tiny("phi3", rope_scaling=rope, original_max_position_embeddings=32)
    model = load_model(save_tiny(hf, tmp_path / "p"))
    assert model.rope_scale > 1.0  # max_position_embeddings 256 > 32: LongRoPE's attention factor
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    assert (extend(model, model.new_cache(32), ids[0].tolist()) - ref).abs().max() <= 1e-4
    with pytest.raises(UnsupportedModelError, match="original_max_position_embeddings"):
        model.new_cache(33)


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}, "multimodal"),
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "causal"),
        ({"model_type": "gpt2"}, "not supported"),
    ],
)
def test_unsupported_settings_say_why(tmp_path, config, why):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=why):
        load_config(tmp_path)
