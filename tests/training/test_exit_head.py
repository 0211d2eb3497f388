"""Exit heads: the logit lens, VocabTrim rows, trained adapters, and their use in plans."""

from __future__ import annotations

import pytest
import torch

import mirror_sd.api as api
from mirror_sd.graphs.heads import ExitHead
from mirror_sd.graphs.loader import load_model
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.runtime.autoregressive import greedy_decode
from mirror_sd.training.collect import collect
from mirror_sd.training.exit_head import agreement, heads_dir, train_head, trained_heads
from tests.conftest import TORCH_DRAFT_MAP, make_tiny, save_tiny_with_tokenizer, tiny_pair
from tests.runtime.conftest import make_plan

LAYER = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return tiny_pair(root)


@pytest.fixture(scope="module")
def model(folders):
    return load_model(folders[0])


@pytest.fixture(scope="module")
def collected(model):
    gen = torch.Generator().manual_seed(0)
    chunks = torch.randint(5, model.config.vocab_size, (40, 64), generator=gen).tolist()
    return collect(model, chunks, [LAYER], progress=False)


@torch.inference_mode()
def _hidden_at(model, ids, layer):
    cache = model.new_cache(len(ids))
    pos = torch.arange(len(ids)).unsqueeze(0)
    return model.run_layers(0, layer, model.embed(torch.tensor([ids])), pos,
                            causal_mask(0, len(ids)), cache)  # fmt: skip


def test_untrained_head_is_the_logit_lens(model):
    h = _hidden_at(model, [5, 6, 7, 8], LAYER)
    head = ExitHead(model, LAYER)
    torch.testing.assert_close(head.exit_logits(h), model.head(h)[0].float())
    assert not head.trained and "logit lens" in head.describe()


def test_trimmed_head_keeps_only_its_rows(model):
    h = _hidden_at(model, [5, 6, 7, 8], LAYER)
    trim = VocabTrim(tuple(range(10, 40)), model.config.vocab_size)
    got = ExitHead(model, LAYER, trim).exit_logits(h)
    full = model.head(h)[0].float()
    assert torch.isinf(got[:, :10]).all() and torch.isinf(got[:, 40:]).all()
    torch.testing.assert_close(got[:, 10:40], full[:, 10:40])
    assert set(got.argmax(-1).tolist()) <= set(range(10, 40))


def test_zero_initialised_adapter_starts_from_the_lens(model):
    h = _hidden_at(model, [5, 6, 7], LAYER)
    torch.testing.assert_close(
        ExitHead(model, LAYER, rank=8).exit_logits(h), ExitHead(model, LAYER).exit_logits(h)
    )


def test_training_beats_the_lens_on_held_out_chunks(model, collected):
    trim = VocabTrim.from_counts(collected.counts(model.config.vocab_size), 97)
    head = train_head(model, collected, LAYER, trim, rank=32, steps=150, batch=128, lr=5e-3,
                      holdout=3)  # fmt: skip
    lens, trained = head.meta["lens"], head.meta["trained"]
    assert trained["top1"] > lens["top1"] + 0.15, (lens, trained)
    assert trained["top4"] >= trained["top1"]
    # the metadata is what agreement() measures on the held-out chunks
    again = agreement(head, collected.hidden[LAYER][-3:], collected.final_top[-3:])
    assert again == pytest.approx(trained)


def test_head_file_round_trip_and_vocab_check(model, collected, tmp_path):
    trim = VocabTrim.from_counts(collected.counts(model.config.vocab_size), 50)
    head = train_head(model, collected, LAYER, trim, rank=16, steps=20, holdout=3)
    path = head.save(tmp_path / "h.pt")
    again = ExitHead.load(path, model)
    h = _hidden_at(model, [9, 8, 7], LAYER)
    torch.testing.assert_close(again.exit_logits(h), head.exit_logits(h))
    assert again.meta["trained"] == head.meta["trained"] and again.trim == trim
    other = load_model(save_tiny_with_tokenizer(make_tiny("qwen2", vocab_size=101), tmp_path / "o"))
    with pytest.raises(ValueError, match="vocabulary of 97"):
        ExitHead.load(path, other)
    (tmp_path / "junk.pt").write_bytes(b"not a head")
    with pytest.raises(ValueError, match="exit-head file"):
        ExitHead.load(tmp_path / "junk.pt", model)


@pytest.mark.parametrize("quality", ["trained", "random"])
def test_plan_with_an_exit_head_stays_lossless(folders, model, collected, quality):
    """Whatever the exit head proposes, the output is the target's greedy decoding."""
    trim = VocabTrim.from_counts(collected.counts(model.config.vocab_size), 60)
    head = train_head(model, collected, LAYER, trim, rank=16, steps=60 if quality == "trained" else 1,
                      holdout=3)  # fmt: skip
    if quality == "random":
        with torch.no_grad():
            head.adapter.up.weight.normal_(0, 1.0)
    draft = load_model(folders[1])
    plan = make_plan(model, draft, exit_layer=LAYER, mode="mirror", exit_top_k=3)
    plan.exit_head = head
    calls = []
    real = head.exit_logits
    head.exit_logits = lambda h: calls.append(h.shape) or real(h)
    try:
        for prompt in ([5, 6, 7], [11, 30, 2, 9, 40]):
            ref = greedy_decode(model, prompt, 20)
            res = plan.generate(prompt, 20)
            assert res.tokens == ref
    finally:
        plan.close()
    assert calls, "the plan never used its exit head"


def test_compile_with_trained_heads(folders, model, collected, tmp_path):
    target, draft, root = folders
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="mirror-sd train exit-head"):
        api.compile(target, draft, TORCH_DRAFT_MAP, cache=cache, exit_head="trained")
    trim = VocabTrim.from_counts(collected.counts(model.config.vocab_size), 80)
    for layer in (2, 4):
        col = collect(model, collected.ids.tolist(), [layer], progress=False)
        head = train_head(model, col, layer, trim, rank=16, steps=40, holdout=3)
        head.save(heads_dir(cache, target) / f"exit-L{layer}-r16-k80.pt")
    assert sorted(trained_heads(cache, target)) == [2, 4]
    with pytest.raises(ValueError, match="has no trained exit head"):
        api.compile(target, draft, TORCH_DRAFT_MAP, cache=cache, exit_head="trained", exit_layer=3)
    # torch devices: no ONNX exports, so the test measures the exit-head logic, not the exporter
    with api.compile(target, draft, TORCH_DRAFT_MAP, cache=cache, exit_head="trained",
                     max_len=256) as plan:  # fmt: skip
        assert plan.spec.exit_layer in (2, 4) and plan.exit_head.layer == plan.spec.exit_layer
        text = api.describe(plan)
        assert "trained adapter" in text and "lens top1" in text
        prompt = [5, 6, 7, 8]
        ref = plan.generate(prompt, 16, mode="autoregressive").tokens
        assert plan.generate(prompt, 16).tokens == ref
        api.save(plan, tmp_path / "plan")
        assert (tmp_path / "plan" / "exit_head.pt").is_file()
    with api.load(tmp_path / "plan") as again:
        assert again.exit_head.layer == plan.spec.exit_layer and again.exit_head.trained
        assert again.generate(prompt, 16).tokens == ref


def test_untrimmed_exits_share_the_model_head_rows_and_trimmed_ones_keep_no_dense_copy(folders):
    """The logit lens reads the model's own LM head (no copy per exit); on a quantized model
    the dequantized head is made once and shared; a trimmed head keeps only its K rows."""
    from mirror_sd.graphs import heads
    from mirror_sd.graphs.quantize import quantize_linears

    dense = load_model(folders[0])
    a, b = ExitHead(dense, 1), ExitHead(dense, LAYER)
    assert a.rows.data_ptr() == b.rows.data_ptr() == dense.lm_head.weight.data_ptr()
    quantized = load_model(folders[0])
    quantize_linears(quantized, "int8")
    trim = VocabTrim(tuple(range(8)), quantized.config.vocab_size)
    t = ExitHead(quantized, LAYER, trim)
    assert t.rows.shape[0] == 8 and quantized.lm_head not in heads._DENSE
    c, d = ExitHead(quantized, 1), ExitHead(quantized, LAYER)
    assert c.rows.data_ptr() == d.rows.data_ptr() and quantized.lm_head in heads._DENSE
    assert torch.equal(t.rows, c.rows[:8])  # the same dequantized values, trimmed
