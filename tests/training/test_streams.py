"""Stream rows for speculative streaming: the training rows attend as the runtime's stream rows
do, training learns a held-out signal, the table is cached, resumable and found again for its
(draft, target) pair, bad input is refused, and `mirror-sd train streams` runs."""

from __future__ import annotations

import random

import pytest
import torch

import mirror_sd.training.streams as streams
from mirror_sd.cli import main as cli_main
from mirror_sd.graphs.loader import load_model
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.streams import StreamTable, with_streams
from mirror_sd.training.collect import Collected
from mirror_sd.training.corpus import Corpus
from mirror_sd.training.streams import PARTIAL, streams_dir, train_streams, trained_streams
from tests.conftest import make_tiny, save_tiny_with_tokenizer, tiny_pair

# Random token chunks (the tiny word-level tokenizer would turn the stdlib into <unk>). The
# tiny random target's argmax over them is dominated by a few tokens the frozen draft's
# mean-row streams do not guess at first: a signal the k rows can learn, and that held-out
# chunks share (with this corpus seed: 0% -> 28% / 34% held-out top-1 for streams 1 / 2).
# Every 7th chunk from the 4th is held out: chunks 3 and 10. Chunks are longer than
# ROW_INVARIANT_ROWS (64), where eager attention takes one kernel for the block instead of
# one per row: the collection pass then takes seconds, not half a minute.
FAST = dict(positions=16, eval_positions=64, progress=False)


def _corpus(n: int = 14, length: int = 72, seed: int = 0) -> Corpus:
    rng = random.Random(seed)
    chunks = [[rng.randrange(97) for _ in range(length)] for _ in range(n)]
    return Corpus(chunks, f"random-{seed}-{n}-{length}", "random token ids (test)")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target, draft, _ = tiny_pair(tmp_path_factory.mktemp("streams-pair"))
    return target, draft


@pytest.fixture(scope="module")
def trained(pair, tmp_path_factory):
    """The default (cached) folder of a 40-step run: (folder, its cache)."""
    cache = tmp_path_factory.mktemp("streams-cache")
    return train_streams(*pair, 2, steps=40, lr=3e-2, corpus=_corpus(), cache=cache, **FAST), cache


def test_stream_rows_attend_as_the_runtime_places_them(pair):
    """Stream j after base position t == the draft fed ids[:t + 1] then streams 1..k causally
    (the layout of `DraftEngine._chain_streamed`), for two base positions in one batch."""
    draft = load_model(pair[1]).requires_grad_(False)
    ids = torch.tensor(_corpus(2, 16).chunks)
    col = Collected(ids, ids.clone(), {}, ids[..., None].clone())
    run = streams._Run(draft, col, {**streams.DEFAULTS, "k": 2, "steps": 1, "init_noise": 1.0})
    cache, _ = run.context(0)
    with torch.no_grad():
        h, at = run.streams(cache, torch.tensor([4, 15]))
        got = run.model.head(h[None])[0]
    assert at.tolist() == [5, 6, 16, 17]
    model = with_streams(draft, run.rows.detach())
    for i, t in enumerate([4, 15]):
        seq = torch.cat([ids[0, : t + 1], torch.tensor([97, 98])])[None]
        n = seq.shape[1]
        want = model(seq, torch.arange(n)[None], causal_mask(0, n), model.new_cache(n))[0, -2:]
        torch.testing.assert_close(got[2 * i : 2 * i + 2], want, rtol=1e-4, atol=1e-5)


def test_training_learns_what_the_held_out_streams_guess(trained):
    p = StreamTable.load(trained[0]).provenance
    before, after = p["agreement"]["before"], p["agreement"]["after"]
    assert after["ce"] < before["ce"] - 0.1
    for b, a in zip(before["streams"], after["streams"], strict=True):
        assert a["target_top1"] >= b["target_top1"] + 0.1, (b, a)
    assert p["corpus"]["heldout_chunks"] == [3, 10] and p["corpus"]["train_chunks"] == 12
    assert before["positions"] == after["positions"] == 64


def test_table_and_provenance(pair, trained):
    folder, cache = trained
    table = StreamTable.load(folder)
    assert table.k == 2 and table.vocab_size == 97 and table.rows.shape == (2, 64)
    table.check(97, 64)
    p = table.provenance
    assert p["kind"] == "speculative-streaming-rows" and p["k"] == 2
    assert p["draft"]["folder"] == str(pair[1]) and p["target"]["folder"] == str(pair[0])
    assert p["corpus"]["identity"] == _corpus().identity and p["settings"]["steps"] == 40
    assert p["train_seconds"] >= 0 and p["torch"] == torch.__version__
    assert folder.parent == streams_dir(cache, pair[1]) and not (folder / PARTIAL).exists()


def test_default_folder_is_cached(pair, trained, monkeypatch):
    folder, cache = trained
    monkeypatch.setattr(streams._Run, "fit", lambda *a: pytest.fail("retrained"))
    again = train_streams(*pair, 2, steps=40, lr=3e-2, corpus=_corpus(), cache=cache, **FAST)
    assert again == folder


def test_trained_streams_finds_the_pair(pair, trained):
    folder, cache = trained
    target, draft = pair
    assert trained_streams(cache, draft, target) == folder
    assert trained_streams(cache, draft, draft) is None  # another target
    assert trained_streams(cache, target, target) is None  # nothing for that draft


class _Interrupted(Exception):
    """Stands for a run killed between two checkpoints."""


def test_an_interrupted_run_resumes_to_the_same_table(pair, tmp_path, monkeypatch):
    kw = dict(steps=12, lr=3e-2, corpus=_corpus(8, 24), cache=tmp_path, checkpoint_every=5, **FAST)
    whole = StreamTable.load(train_streams(*pair, 2, out=tmp_path / "whole", **kw))
    schedule = streams.lr_schedule

    def interrupted(step, total, warm):
        if step == 7:
            raise _Interrupted
        return schedule(step, total, warm)

    monkeypatch.setattr(streams, "lr_schedule", interrupted)
    with pytest.raises(_Interrupted):
        train_streams(*pair, 2, out=tmp_path / "resumed", **kw)
    assert torch.load(tmp_path / "resumed" / PARTIAL, weights_only=True)["step"] == 5
    monkeypatch.setattr(streams, "lr_schedule", schedule)
    fit, starts = streams._Run.fit, []
    monkeypatch.setattr(streams._Run, "fit", lambda self, state, *a: (
        starts.append(state["step"]), fit(self, state, *a)))  # fmt: skip
    resumed = StreamTable.load(train_streams(*pair, 2, out=tmp_path / "resumed", **kw))
    assert starts == [5] and not (tmp_path / "resumed" / PARTIAL).exists()
    assert torch.equal(resumed.rows, whole.rows)
    assert resumed.provenance["agreement"] == whole.provenance["agreement"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(k=0), r"k = 0: must be >= 1"),
        (dict(steps=0), r"steps = 0: must be >= 1"),
        (dict(lr=0.0), r"lr = 0.0: must be > 0"),
        (dict(positions=0), r"positions = 0"),
    ],
)
def test_bad_settings_are_clear_errors(pair, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_streams(*pair, corpus=_corpus(), cache=tmp_path, **{**FAST, **kwargs})


def test_unknown_setting_and_foreign_vocabulary(pair, tmp_path):
    with pytest.raises(TypeError, match="unknown stream training settings"):
        train_streams(*pair, corpus=_corpus(), cache=tmp_path, progress=False, rank=3)
    small = make_tiny("qwen2", seed=2, num_hidden_layers=1, vocab_size=50)
    small = save_tiny_with_tokenizer(small, tmp_path / "small")
    with pytest.raises(ValueError, match="must share the target's tokenizer"):
        train_streams(pair[0], small, steps=1, corpus=_corpus(), cache=tmp_path, **FAST)


def test_cli(pair, tmp_path, capsys):
    target, draft = map(str, pair)
    args = ["train", "streams", target, "--draft", draft, "--steps", "2", "--chunks", "4",
            "--chunk-len", "16", "--positions", "4", "--cache", str(tmp_path), "--quiet"]  # fmt: skip
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "stream 1:" in out and "stream 2:" in out and "draft_streams: trained" in out
    assert StreamTable.load(trained_streams(tmp_path, draft, target)).k == 2
    assert cli_main([*args, "--k", "0"]) == 2
    assert capsys.readouterr().err.startswith("mirror-sd: error: k = 0: must be >= 1")
