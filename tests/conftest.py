"""Shared fixtures: tiny random-weight models of every supported family saved as HF folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mirror_sd.graphs.families import SUPPORTED_ARCHITECTURES

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# What each family's tiny model sets on top of TINY: small windows and odd scalings, so the
# tests exercise what differs from Llama. No EOS token for these: generate(min_new_tokens=...)
# would suppress a token that greedy_decode is free to pick.
TINY_FAMILY: dict[str, dict] = {
    "gemma3_text": dict(
        head_dim=16,
        query_pre_attn_scalar=24,  # not head_dim: the scaling is the config's
        sliding_window=4,
        layer_types=["sliding_attention"] * 2 + ["full_attention", "sliding_attention"],
        eos_token_id=None,
    ),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=6, eos_token_id=None, pad_token_id=0),
}
# The families the parametrized tests run: every registered one (graphs.families).
FAMILIES = list(SUPPORTED_ARCHITECTURES)

# `make test` hands whole files to two workers (--dist loadfile) in collection order
# (--no-loadscope-reorder; xdist would otherwise send the files with the most tests first,
# and the few-test, long files last, where one worker ran alone for minutes). The longest
# files go first, so the short ones fill the gaps at the end (longest processing time first).
# Seconds per file in `make test` on the 2-core AVX2 EPYC (2026-12-05, --durations=0); a file
# not listed takes under ~30 s and keeps its place. Only a scheduling hint: a stale number
# costs wall time, never a test.
FILE_SECONDS = {
    "tests/graphs/test_layered.py": 270,
    "tests/graphs/test_export.py": 172,
    "tests/test_api_mode_auto.py": 125,
    "tests/test_api.py": 87,
    "tests/test_real_models.py": 77,
    "tests/test_quantized_sampling.py": 76,
    "tests/distributed/test_real_smollm2.py": 71,
    "tests/runtime/test_sorted_exits.py": 69,
    "tests/distributed/test_tp.py": 66,
    "tests/devices/test_ort.py": 64,
    "tests/runtime/test_batch.py": 58,
    "tests/runtime/test_head_drafts.py": 57,
    "tests/test_cli.py": 54,
    "tests/graphs/test_int7_rows.py": 54,
    "tests/graphs/test_row_invariance.py": 51,
    "tests/devices/test_trimmed.py": 46,
    "tests/test_api_amphista.py": 44,
    "tests/devices/test_ort_batch.py": 39,
    "tests/test_gpu_check.py": 39,
    "tests/bench/test_peers.py": 38,
    "tests/serve/test_cli_serve.py": 38,
    "tests/serve/test_multi_target.py": 38,
    "tests/test_progress.py": 37,
    "tests/test_export_worker.py": 32,
    "tests/serve/test_concurrency.py": 32,
}


def pytest_collection_modifyitems(config, items):
    """The files of FILE_SECONDS first, longest first; a file's tests keep their order."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.nodeid.split("::")[0], 0))


def make_tiny(family: str, seed: int = 0, **overrides):
    """A random transformers model of `family` (a registered `model_type`), fp32."""
    cfg = AutoConfig.for_model(family, **{**TINY, **TINY_FAMILY.get(family, {}), **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # break the near-zero init so logits are not all ties
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_tiny(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(params=FAMILIES)
def tiny_hf(request, tmp_path):
    """(family, transformers model, saved folder) for each supported family."""
    model = make_tiny(request.param)
    return request.param, model, save_tiny(model, tmp_path / request.param)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(vocab_size: int = 97):
    """A word-level tokenizer of exactly `vocab_size` entries with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = [f"w{i}" for i in range(vocab_size - len(special))]
    vocab = {t: i for i, t in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


TORCH_DRAFT_MAP = """
version: 1
devices:
  a: {backend: torch, device: cpu, threads: 1}
  b: {backend: torch, device: cpu}
placement: {target: a, draft: b}
"""


def tiny_pair(root: Path) -> tuple[Path, Path, Path]:
    """(target, draft, root): a 6-layer Qwen2 target and a 2-layer draft sharing its
    tokenizer, saved as complete HF folders under `root`."""
    target = save_tiny_with_tokenizer(make_tiny("qwen2", seed=0, num_hidden_layers=6), root / "t")
    draft = save_tiny_with_tokenizer(make_tiny("qwen2", seed=1, num_hidden_layers=2), root / "d")
    return target, draft, root


def save_tiny_with_tokenizer(model, folder: Path) -> Path:
    """A complete local HF folder: weights, config and a tokenizer (what compile() takes)."""
    save_tiny(model, folder)
    make_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder
