"""VocabTrim calibration: the ids a trim keeps, the target's own counts (cached), the
`mirror-sd calibrate vocab` command, and the per-K report (step time, held-out agreement)."""

from __future__ import annotations

import json

import pytest
import torch

from mirror_sd.cli import main as cli_main
from mirror_sd.graphs.loader import load_model
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.runtime.autoregressive import extend
from mirror_sd.training import vocab
from mirror_sd.training.corpus import Corpus
from tests.conftest import make_tiny, save_tiny_with_tokenizer

V = 97


def fake_corpus(tokenizer, n_chunks, chunk_len=512, seed=0, **_):
    """Random token chunks: the tiny word-level tokenizer reads the stdlib as all <unk>."""
    g = torch.Generator().manual_seed(seed)
    chunks = torch.randint(5, len(tokenizer), (n_chunks, chunk_len), generator=g).tolist()
    return Corpus(chunks, f"fake-{seed}-{n_chunks}-{chunk_len}", f"{n_chunks} random chunks")


@pytest.fixture
def corpus(monkeypatch):
    monkeypatch.setattr(vocab, "build_corpus", fake_corpus)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    target = save_tiny_with_tokenizer(make_tiny("qwen2", seed=0, num_hidden_layers=4), root / "t")
    draft = save_tiny_with_tokenizer(make_tiny("qwen2", seed=1, num_hidden_layers=2), root / "d")
    return target, draft


# --- VocabTrim itself -----------------------------------------------------------------------
def test_from_counts_ranks_by_count_then_id_and_keeps_always():
    counts = torch.zeros(10, dtype=torch.long)
    counts[[7, 3, 5, 8]] = torch.tensor([9, 4, 4, 1])
    trim = VocabTrim.from_counts(counts, 4, "src")
    assert trim.keep == (7, 3, 5, 8) and trim.source == "src"
    assert VocabTrim.from_counts(counts, 6).keep == (7, 3, 5, 8, 0, 1)  # zero counts: by id
    forced = VocabTrim.from_counts(counts, 4, always=(9,))
    assert forced.keep == (7, 3, 5, 9) and forced.size == 4  # EOS replaces the least frequent
    with pytest.raises(ValueError, match=r"size 11 outside \[1, 10\]"):
        VocabTrim.from_counts(counts, 11)


def test_expand_coverage_and_files(tmp_path):
    trim = VocabTrim((4, 1), 6, "counts of x")
    out = trim.expand(torch.tensor([[2.0, 3.0], [5.0, -1.0]]))
    inf = float("-inf")
    assert torch.equal(
        out, torch.tensor([[inf, 3.0, inf, inf, 2.0, inf], [inf, -1.0, inf, inf, 5.0, inf]])
    )
    assert trim.coverage(torch.tensor([0, 3, 0, 1, 6, 0])) == 0.9
    assert VocabTrim.load(trim.save(tmp_path / "t.json")) == trim
    (tmp_path / "bad.json").write_text(json.dumps({"keep": [1]}))
    with pytest.raises(ValueError, match="not a VocabTrim file"):
        VocabTrim.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="outside"):
        VocabTrim((6,), 6)


# --- counts ---------------------------------------------------------------------------------
def test_counts_are_the_targets_own_argmax_and_are_cached(folders, tmp_path, corpus, monkeypatch):
    target, _ = folders
    counts, source = vocab.vocab_counts(target, tmp_path, n_chunks=3, chunk_len=24, progress=False)
    model = load_model(target)
    want = torch.zeros(V, dtype=torch.long)
    for chunk in fake_corpus(range(V), 3, 24).chunks:
        want += torch.bincount(extend(model, model.new_cache(24), chunk).argmax(-1), minlength=V)
    assert torch.equal(counts, want) and counts.sum() == 3 * 24
    assert "3 random chunks" in source and "fake-0-3-24" in source
    monkeypatch.setattr(vocab, "collect", lambda *a, **k: pytest.fail("recomputed"))
    again, _ = vocab.vocab_counts(target, tmp_path, n_chunks=3, chunk_len=24, progress=False)
    assert torch.equal(again, counts)  # from <cache>/vocab, no target pass
    assert len(list((tmp_path / "vocab").glob("labels-*.pt"))) == 1
    with pytest.raises(pytest.fail.Exception, match="recomputed"):  # another corpus: a miss
        vocab.vocab_counts(target, tmp_path, n_chunks=3, chunk_len=24, seed=1, progress=False)


def test_make_trim_adds_eos_and_rejects_a_bad_k():
    counts = torch.arange(20, 0, -1)
    trim, cov = vocab.make_trim(counts, "s", 5, always=(19, 19))
    assert trim.keep == (0, 1, 2, 3, 19) and cov == pytest.approx((20 + 19 + 18 + 17 + 1) / 210)
    with pytest.raises(ValueError, match=r"vocab_size 21 is outside \[1, 20\].*use 0"):
        vocab.make_trim(counts, "s", 21)


def test_counts_file_and_coverage_table(tmp_path):
    counts = torch.tensor([0, 5, 0, 3, 2])
    path = vocab.save_counts(tmp_path / "c.json", counts, "here")
    back, source = vocab.load_counts(path)
    assert torch.equal(back, counts) and source == "here"
    assert vocab.coverage_table(counts, (1, 2, 0)) == [(1, 0.5), (2, 0.8), (5, 1.0)]
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a counts file"):
        vocab.load_counts(tmp_path / "x.json")


def test_cli_prints_coverage_and_writes_counts(folders, tmp_path, corpus, capsys):
    target, _ = folders
    out = tmp_path / "counts.json"
    assert cli_main(["calibrate", "vocab", str(target), "--chunks", "2", "--chunk-len", "16",
                     "--cache", str(tmp_path), "-o", str(out), "--ks", "4,0"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "32 target tokens" in text and f"top-{V}: 100.00%" in text and "top-4: " in text
    counts, _ = vocab.load_counts(out)
    want, _ = vocab.vocab_counts(target, tmp_path, n_chunks=2, chunk_len=16, progress=False)
    assert torch.equal(counts, want)


def test_report_measures_each_k_on_held_out_text(folders, tmp_path, corpus):
    from mirror_sd.training.vocab_report import format_report, vocab_trim_report

    target, draft = folders
    rep = vocab_trim_report(target, draft, (8, 0), cache=tmp_path, onnx_dir=tmp_path / "onnx",
                            quantize="none", n_chunks=2, chunk_len=32, heldout_chunks=2,
                            context=8, reps=1, progress=False)  # fmt: skip
    trimmed, full = rep["rows"]
    assert (trimmed["k"], full["k"]) == (8, V) and rep["heldout_tokens"] == 2 * 32
    assert full["coverage_heldout"] == 1.0 and trimmed["coverage_heldout"] < 1.0
    for row in rep["rows"]:  # a draft can only agree on tokens it may propose
        assert 0 <= row["agreement"] <= row["coverage_heldout"] + 1e-9
        assert row["step_ms_1"] > 0 and row["step_ms_5"] > 0
    # the full-vocabulary agreement, recomputed with torch on the same held-out chunks
    t_model, d_model = load_model(target), load_model(draft)
    held = fake_corpus(range(V), 2, 32, seed=1000).chunks
    same = sum(
        int((extend(t_model, t_model.new_cache(32), c).argmax(-1)
             == extend(d_model, d_model.new_cache(32), c).argmax(-1)).sum())
        for c in held
    )  # fmt: skip
    assert abs(full["agreement"] - same / 64) <= 2 / 64  # ORT vs torch may flip a near-tie
    assert "| 8 |" in format_report(rep) and "-v8-" in trimmed["onnx"]
