"""A VocabTrim draft: the trimmed head (torch and ONNX), TrimmedVocabRunner's expansion, and
plans with it that stay lossless (greedy and sampling) while proposing only kept tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mirror_sd.devices.base import DeviceError, ModelRunner
from mirror_sd.devices.ort_core import OrtDevice
from mirror_sd.devices.ort_device import OrtRunner
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.devices.trimmed import TrimmedVocabRunner
from mirror_sd.graphs import export as graphs_export
from mirror_sd.graphs.loader import load_model
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.trimmed_head import export_trimmed, trim_identity, with_trimmed_head
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.runtime.autoregressive import extend, greedy_decode
from mirror_sd.runtime.draft_engine import DraftEngine
from tests.conftest import make_tiny, save_tiny
from tests.runtime.conftest import (
    CHI2_99_9,
    chi2,
    make_plan,
    sample_counts,
    target_dists,
    tiny_model,
)

V = 97


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny Qwen2 whose LM head is tied to its embedding table (as Qwen2.5-0.5B's is)."""
    hf = make_tiny("qwen2", seed=5, num_hidden_layers=2, tie_word_embeddings=True)
    return load_model(save_tiny(hf, tmp_path_factory.mktemp("tied")))


def _trim(k: int, seed: int = 0, vocab: int = V) -> VocabTrim:
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:k]
    return VocabTrim(tuple(ids.tolist()), vocab)


def _full_logits(model, ids):
    return extend(model, model.new_cache(64), ids)  # (T, V)


def test_trimmed_head_keeps_its_rows_and_leaves_the_model_alone(tied):
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    trim = _trim(20)
    small = with_trimmed_head(tied, trim)
    assert small.lm_head.weight.shape == (20, tied.config.hidden_size)
    assert small.lm_head.weight.data_ptr() != tied.model.embed_tokens.weight.data_ptr()
    assert small.model is tied.model  # the backbone is shared, not copied
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # the original is untouched
    assert tied.lm_head.out_features == V
    ids = [5, 9, 31, 2, 77]
    torch.testing.assert_close(_full_logits(small, ids), _full_logits(tied, ids)[:, trim.ids()])


def test_a_trim_of_another_vocabulary_is_refused(tied):
    with pytest.raises(ValueError, match="does not fit a model with a vocabulary of 97"):
        with_trimmed_head(tied, VocabTrim((1, 2), 151936))


def test_runner_expands_to_the_full_vocabulary_with_minus_inf_elsewhere(tied):
    trim = _trim(16)
    inner = TorchRunner(with_trimmed_head(tied, trim), TorchDevice(), 64, name="draft")
    runner = TrimmedVocabRunner(inner, trim)
    assert isinstance(runner, ModelRunner) and runner.vocab_size == V
    assert "vocabulary trimmed to 16" in runner.name and runner.max_len == 64
    ids = [5, 9, 31, 2]
    out = runner.forward(torch.tensor([ids]), torch.arange(4)[None], causal_mask(0, 4))
    assert out.shape == (4, V) and runner.length == 4
    kept = torch.zeros(V, dtype=torch.bool)
    kept[trim.ids()] = True
    assert torch.isfinite(out[:, kept]).all() and torch.isneginf(out[:, ~kept]).all()
    torch.testing.assert_close(out[:, kept], _full_logits(tied, ids)[:, kept])
    assert set(out.argmax(-1).tolist()) <= set(trim.keep)
    runner.rollback(2)
    assert inner.length == runner.length == 2
    runner.forward(torch.tensor([[7, 8]]), torch.arange(2, 4)[None], causal_mask(2, 2))
    runner.keep(2, [3])
    assert inner.length == 3
    assert runner.cache is inner.cache  # anything else is the wrapped runner's


def test_runner_refuses_logits_of_another_width(tied):
    trim = _trim(16)
    runner = TrimmedVocabRunner(TorchRunner(tied, TorchDevice(), 16), trim)  # head not trimmed
    with pytest.raises(DeviceError, match=r"returned logits \(1, 97\), expected \(1, 16\)"):
        runner.forward(torch.tensor([[3]]), torch.zeros(1, 1, dtype=torch.long),
                       causal_mask(0, 1))  # fmt: skip


def test_each_trim_gets_its_own_onnx_export_that_matches_torch(tied, tmp_path, monkeypatch):
    key = {"tiny": "tied", "seed": 5}
    t16, t32, t16b = _trim(16), _trim(32), _trim(16, seed=1)
    p16 = export_trimmed(tied, tmp_path, key, t16)  # real: run against torch below
    heads = []  # the other two test the cache's naming: the exporter is faked for them (each
    # real export takes ~10 s; test_api_vocab_trim.py runs a real one at another K)

    def fake_export(model, path, *args, **kw):
        heads.append(model.lm_head.weight.shape[0])
        Path(path).write_bytes(b"graph")
        return Path(path)

    monkeypatch.setattr(graphs_export, "export_stages", fake_export)
    paths = {
        p16,
        export_trimmed(tied, tmp_path, key, t32),
        export_trimmed(tied, tmp_path, key, t16b),
    }
    assert len(paths) == 3  # another K, or the same K with other ids: another file
    assert heads == [32, 16]  # each export got its own trimmed head
    assert "-v16-" in p16.parent.name and trim_identity(t16) != trim_identity(t16b)
    assert export_trimmed(tied, tmp_path, dict(key), t16) == p16  # cached: same trim, same file
    ort_runner = TrimmedVocabRunner(OrtRunner(p16, OrtDevice(intra_op_threads=1), 32), t16)
    torch_runner = TrimmedVocabRunner(TorchRunner(with_trimmed_head(tied, t16), TorchDevice(), 32),
                                      t16)  # fmt: skip
    ids, pos, mask = torch.tensor([[4, 8, 15, 16, 23]]), torch.arange(5)[None], causal_mask(0, 5)
    a, b = ort_runner.forward(ids, pos, mask), torch_runner.forward(ids, pos, mask)
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    kept = t16.ids()
    assert (a[:, kept] - b[:, kept]).abs().max() < 1e-4


def _record_proposals(monkeypatch) -> list[int]:
    """Every token the draft model picks (not branch tokens, which the exit head supplies)."""
    seen: list[int] = []
    pick = DraftEngine._pick

    def recording(self, sids, rows):
        tokens, qs = pick(self, sids, rows)
        seen.extend(tokens)
        return tokens, qs

    monkeypatch.setattr(DraftEngine, "_pick", recording)
    return seen


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_greedy_stays_lossless_and_proposals_stay_in_the_kept_set(tmp_path, monkeypatch, mode):
    """Self-speculation (draft = target) with one of the target's own tokens trimmed away: the
    draft is still accepted where it can be, never proposes the missing token, and every
    round that needs that token is rejected there: output = target greedy."""
    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    prompt = [11, 42, 7, 3, 19]
    ref = greedy_decode(target, prompt, 32)
    dropped = max(set(ref), key=ref.count)  # the target's most frequent token here
    rest = [i for i in range(V) if i != dropped and i not in ref][: 40 - len(set(ref)) + 1]
    trim = VocabTrim(tuple(sorted(set(ref) - {dropped})) + tuple(rest), V)
    draft = with_trimmed_head(tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4), trim)
    runner = TrimmedVocabRunner(TorchRunner(draft, TorchDevice(), 512, name="draft"), trim)
    seen = _record_proposals(monkeypatch)
    plan = make_plan(target, None, draft_runner=runner, mode=mode, num_draft_tokens=3)
    try:
        res = plan.generate(prompt, 32)
    finally:
        plan.close()
    assert res.tokens == ref
    assert res.stats.fallback is None and seen  # the draft really ran
    assert set(seen) <= set(trim.keep) and dropped not in seen
    assert res.stats.mean_accepted > 1.5  # a self-draft is accepted wherever it may be
    assert any(r.accepted < 3 for r in res.rounds)  # ... and rejected at `dropped`


def test_sampling_stays_lossless_with_a_trimmed_draft(tmp_path):
    """Mirror mode, temperature 1, a draft that can propose only 3 of the 6 tokens: the joint
    law of the first two tokens and the law of the third are still the target's."""
    v = 6
    small = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3, **small)
    trim = VocabTrim((0, 2, 5), v)
    draft = with_trimmed_head(tiny_model(tmp_path, "llama", seed=9, num_hidden_layers=1, **small),
                              trim)  # fmt: skip
    runner = TrimmedVocabRunner(TorchRunner(draft, TorchDevice(), 512, name="draft"), trim)
    plan = make_plan(target, None, draft_runner=runner, mode="mirror", num_draft_tokens=2,
                     exit_top_k=v, branch_budget=3 * v, temperature=1.0)  # fmt: skip
    prompt = [1, 2, 3]

    joint, third = target_dists(target, prompt, v)
    pairs, thirds = sample_counts(plan, prompt, v)
    assert thirds[[1, 3, 4]].sum() > 0  # tokens the draft cannot propose still come out

    assert chi2(pairs.flatten(), joint.flatten()) < CHI2_99_9[35]
    assert chi2(thirds, third) < CHI2_99_9[5]
    # power: the law with zero mass outside the kept set is clearly rejected by this test
    masked = joint.clone()
    masked[[1, 3, 4], :] = 0
    masked[:, [1, 3, 4]] = 0
    masked = (masked + 1e-9) / (masked + 1e-9).sum()
    assert chi2(pairs.flatten(), masked.flatten()) > CHI2_99_9[35]
