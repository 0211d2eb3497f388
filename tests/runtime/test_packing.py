"""PackedCache: sequences packed in one cache see only their own columns (the mask), keep their
own positions, and compaction moves rows without changing any sequence's logits."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.graphs.kv_cache import CacheFullError
from mirror_sd.runtime.autoregressive import extend
from mirror_sd.runtime.packing import HOLE, PackedCache
from tests.runtime.conftest import tiny_model

TOL = 1e-4


@pytest.fixture
def model(tmp_path):
    return tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3)


def alone(model, tokens: list[int]) -> torch.Tensor:
    """Logits (T, V) of `tokens` decoded alone from an empty cache."""
    return extend(model, model.new_cache(64), tokens)


def test_inputs_mask_own_columns_and_positions(model):
    cache = PackedCache(TorchRunner(model, TorchDevice(), 64))
    cache.add("a"), cache.add("b")
    cache.forward({"a": [1, 2], "b": [3]})
    ids, pos, mask = cache.inputs({"b": [4, 5], "a": [6]})
    assert ids.tolist() == [[4, 5, 6]] and pos.tolist() == [[1, 2, 2]]
    expect = [
        [0, 0, 1, 1, 0, 0],  # b's 4: b's column 2, itself
        [0, 0, 1, 1, 1, 0],  # b's 5: b's column, 4, itself
        [1, 1, 0, 0, 0, 1],  # a's 6: a's columns 0, 1, itself
    ]
    assert mask.int().tolist() == [expect]


def test_packed_rows_equal_each_sequence_alone(model):
    """Interleaved forwards, a rejected tail (holes), a departure and a compaction: every
    sequence's logits stay those of decoding it alone."""
    cache = PackedCache(TorchRunner(model, TorchDevice(), 64))
    seqs = {"a": [5, 9, 2], "b": [7], "c": [1, 1, 4, 8]}
    for sid in seqs:
        cache.add(sid)
    cache.forward(seqs)
    out = cache.forward({"a": [3, 3, 3], "b": [6], "c": [2]})
    for sid, toks in {"a": [3, 3, 3], "b": [6], "c": [2]}.items():
        seqs[sid] += toks
        ref = alone(model, seqs[sid])[-len(toks) :]
        assert (out[sid] - ref).abs().max() <= TOL
    cache.truncate("a", 4)  # a's last two rows were rejected: holes in the middle
    seqs["a"] = seqs["a"][:4]
    cache.drop("b")  # b left
    assert cache.holes == 4 and (cache.owner[: cache.runner.length] == HOLE).sum() == 4
    cache.compact()
    assert cache.holes == 0 and cache.compactions == 1 and cache.runner.length == 9
    out = cache.forward({"c": [9], "a": [4]})
    for sid, tok in (("a", 4), ("c", 9)):
        seqs[sid].append(tok)
        assert (out[sid][-1] - alone(model, seqs[sid])[-1]).abs().max() <= TOL
    assert cache.tokens["a"] == seqs["a"] and cache.tokens["c"] == seqs["c"]


def test_full_cache_compacts_then_names_the_limit(model):
    cache = PackedCache(TorchRunner(model, TorchDevice(), 8))
    cache.add("a"), cache.add("b")
    cache.forward({"a": [1, 2, 3], "b": [4, 5, 6]})
    cache.truncate("a", 1)  # two holes between a's row and b's rows
    cache.forward({"b": [7, 8]})  # 6 + 2 fits
    cache.truncate("b", 3)  # b's 7, 8 dropped: trailing columns roll back
    assert cache.runner.length == 6 and cache.holes == 2
    cache.forward({"a": [9, 9, 9, 9]})  # 6 + 4 > 8: compacts to 4 first
    assert cache.compactions == 1 and cache.runner.length == 8
    with pytest.raises(CacheFullError, match="raise max_len or run fewer sequences"):
        cache.forward({"b": [1]})
