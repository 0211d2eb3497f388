"""Target-only decoding through the stages: the reference every speculative mode must equal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mirror_sd.graphs.kv_cache import StaticKVCache
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.model import CausalLM


def positions(start: int, n: int) -> torch.Tensor:
    """Position ids (1, n) for n new rows after `start` committed ones."""
    return torch.arange(start, start + n).unsqueeze(0)


@torch.inference_mode()
def extend(model: CausalLM, cache: StaticKVCache, ids: Sequence[int]) -> torch.Tensor:
    """Append tokens causally after the cache's valid rows; returns their logits (T, V) on
    the model's device."""
    dev = model.model.embed_tokens.weight.device
    n = len(ids)
    pos, mask = positions(cache.length, n).to(dev), causal_mask(cache.length, n).to(dev)
    return model(torch.tensor([list(ids)], device=dev), pos, mask, cache)[0]


@torch.inference_mode()
def greedy_decode(
    model: CausalLM,
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_ids: Iterable[int] = (),
    max_len: int | None = None,
) -> list[int]:
    """Greedy decoding, one target forward per token; returns only the new tokens."""
    eos = set(eos_ids)
    cache = model.new_cache(max_len or len(prompt) + max_new_tokens)
    logits = extend(model, cache, prompt)[-1]
    out: list[int] = []
    while len(out) < max_new_tokens:
        tok = int(logits.argmax())
        out.append(tok)
        if tok in eos or len(out) == max_new_tokens:
            break
        logits = extend(model, cache, [tok])[-1]
    return out
