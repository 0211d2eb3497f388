"""Amphista heads: the untrained heads are the logit lens, the block is bi-directional,
training learns a learnable signal, propose / files / resume / the CLI."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.cli import main as cli_main
from mirror_sd.graphs.amphista import AmphistaHeads
from mirror_sd.graphs.heads import ExitHead
from mirror_sd.graphs.loader import load_model
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.training import amphista
from mirror_sd.training.amphista import agreement, train_amphista, trained_amphista
from mirror_sd.training.collect import Collected, collect
from mirror_sd.training.exit_head import heads_dir
from tests.conftest import make_tiny, save_tiny_with_tokenizer

LAYER, K = 2, 3
FAST = dict(rank=16, batch=64, lr=5e-3, holdout=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_with_tokenizer(make_tiny("qwen2"), tmp_path_factory.mktemp("amph") / "t")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def real(model):
    """The tiny target's own collection over random chunks (8 x 24 tokens)."""
    chunks = torch.randint(5, 97, (8, 24), generator=torch.Generator().manual_seed(0))
    return collect(model, chunks.tolist(), [LAYER], progress=False)


@pytest.fixture(scope="module")
def learnable(model):
    """A Collected whose labels follow the hidden state: the corpus walks a fixed cycle over
    24 tokens, hidden[t] is token t's random vector (+ noise), and the target's choice is
    the corpus's next token, so labels[t + j] is a function of hidden[t] for every j."""
    g = torch.Generator().manual_seed(1)
    alphabet = torch.randperm(97, generator=g)[:24]
    step = torch.randperm(24, generator=g)  # a -> step[a]
    a = torch.empty(12, 40, dtype=torch.long)
    a[:, 0] = torch.randint(0, 24, (12,), generator=g)
    for t in range(1, 40):
        a[:, t] = step[a[:, t - 1]]
    vectors = torch.randn(24, model.config.hidden_size, generator=g)
    hidden = vectors[a] + 0.05 * torch.randn(*a.shape, vectors.shape[1], generator=g)
    labels = alphabet[step[a]]
    col = Collected(alphabet[a], labels, {LAYER: hidden.half()}, labels[..., None])
    return col, VocabTrim(tuple(alphabet.tolist()), 97)


@pytest.fixture(scope="module")
def trained(model, learnable):
    col, trim = learnable
    return train_amphista(model, col, LAYER, K, trim, steps=150, seed=0, **FAST)


def test_untrained_heads_are_the_logit_lens(model, real):
    trim = VocabTrim.from_counts(real.counts(97), 40)
    h = real.hidden[LAYER][0].float()  # (T, D)
    logits = AmphistaHeads(model, LAYER, K, trim, rank=16)(h)  # (T, K, 40)
    lens = ExitHead(model, LAYER, trim)(h)
    assert logits.shape == (24, K, 40)
    for j in range(K):
        assert torch.equal(logits[:, j], lens)


def test_the_block_is_bidirectional(model, real):
    """Once the auto-embedding block is on, head 1 reads head K's state (and K head 1's)."""
    heads = AmphistaHeads(model, LAYER, K, rank=16)
    h = real.hidden[LAYER][0, :5].float()
    torch.nn.init.normal_(heads.mix.out.weight, std=0.5)
    before = heads(h).detach()
    with torch.no_grad():
        heads.embed[K - 1].normal_()
    after = heads(h).detach()
    assert not torch.allclose(before[:, 0], after[:, 0])
    with torch.no_grad():
        heads.embed[0].normal_()
    assert not torch.allclose(after[:, K - 1], heads(h)[:, K - 1])


def test_training_learns_a_learnable_signal(trained):
    lens, got = trained.meta["lens"], trained.meta["trained"]
    for j in range(K):
        assert got["top1"][j] > lens["top1"][j] + 0.3, (lens, got)
        assert got["ce"][j] < lens["ce"][j]
        assert got["top4"][j] >= got["top1"][j]
    assert got["chain"] > lens["chain"] + 0.5
    m = trained.meta
    assert m["train_tokens"] == 10 * (40 - K) and m["heldout_tokens"] == 2 * (40 - K)
    assert m["settings"]["steps"] == 150 and m["train_seconds"] >= 0


def test_agreement_is_what_propose_says(model, trained, learnable):
    """Held-out top-1 per head and the chain, recounted one row at a time with propose(), on
    heads trained just enough to be right some of the time."""
    col, trim = learnable
    partial = train_amphista(model, col, LAYER, K, trim, steps=12, seed=0, **FAST)
    hid, lab = col.hidden[LAYER][-2:], col.labels[-2:]
    hits, chain = [0] * K, 0
    for c in range(2):
        for t in range(40 - K):
            top, _ = partial.propose(hid[c, t])
            right = [top[j] == int(lab[c, t + j + 1]) for j in range(K)]
            hits = [a + b for a, b in zip(hits, right, strict=True)]
            chain += next((j for j, r in enumerate(right) if not r), K)
    n = 2 * (40 - K)
    got = agreement(partial, hid, lab)
    assert 0 < got["chain"] < K and any(0 < x < 1 for x in got["top1"]), got
    assert got["top1"] == pytest.approx([x / n for x in hits])
    assert got["chain"] == pytest.approx(chain / n) and got["positions"] == n
    assert got == partial.meta["trained"]
    assert agreement(trained, hid, lab) == trained.meta["trained"]


def test_propose_returns_full_vocabulary_ids(model, real):
    trim = VocabTrim.from_counts(real.counts(97), 30)
    heads = AmphistaHeads(model, LAYER, K, trim, rank=16)
    torch.nn.init.normal_(heads.embed, std=2.0)  # heads that differ from the lens and each other
    top, alts = heads.propose(real.hidden[LAYER][1, 5], top_k=4)  # a float16 row
    assert len(top) == len(alts) == K
    for t, alt in zip(top, alts, strict=True):
        assert t in trim.keep and len(alt) == 3 and t not in alt and len(set(alt)) == 3
        assert set(alt) <= set(trim.keep)
    assert heads.propose(real.hidden[LAYER][1, 5])[1] == [[]] * K


def test_file_round_trip_and_refusals(model, trained, learnable, tmp_path):
    path = trained.save(tmp_path / "a.pt")
    again = AmphistaHeads.load(path, model)
    h = learnable[0].hidden[LAYER][0].float()
    assert torch.equal(again(h), trained(h))
    assert again.meta == trained.meta and again.trim == trained.trim
    assert "3 heads (rank 16)" in again.describe() and "chain" in again.describe()
    other = load_model(save_tiny_with_tokenizer(make_tiny("qwen2", vocab_size=101), tmp_path / "o"))
    with pytest.raises(ValueError, match=r"vocabulary of 97.*mirror-sd train amphista"):
        AmphistaHeads.load(path, other)
    (tmp_path / "junk.pt").write_bytes(b"not heads")
    with pytest.raises(ValueError, match="not a readable amphista heads file"):
        AmphistaHeads.load(tmp_path / "junk.pt", model)
    exit_file = ExitHead(model, LAYER, rank=4).save(tmp_path / "exit.pt")
    with pytest.raises(ValueError, match="not an amphista heads file"):
        AmphistaHeads.load(exit_file, model)


def test_bad_settings_are_refused(model):
    with pytest.raises(ValueError, match=r"outside \[1, 3\]"):
        AmphistaHeads(model, 4, K)
    with pytest.raises(ValueError, match="heads = 0"):
        AmphistaHeads(model, LAYER, 0)
    with pytest.raises(ValueError, match="VocabTrim is for a vocabulary of 50"):
        AmphistaHeads(model, LAYER, K, VocabTrim((1, 2), 50))


class _Stop(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_heads(model, learnable, tmp_path, monkeypatch):
    col, trim = learnable
    run = dict(steps=20, seed=3, checkpoint_every=5, **FAST)
    whole = train_amphista(model, col, LAYER, K, trim, **run)
    starts, stop = [], {"at": 12}

    def bar(steps, **_):  # progress.bar, raising before step stop["at"] (when set)
        starts.append(steps.start)
        for i in steps:
            if i == stop["at"]:
                raise _Stop
            yield i

    ckpt = tmp_path / "run.ckpt"
    monkeypatch.setattr(amphista.progress, "bar", bar)
    with pytest.raises(_Stop):
        train_amphista(model, col, LAYER, K, trim, checkpoint=ckpt, **run)
    assert torch.load(ckpt, weights_only=True)["step"] == 10  # saved every 5 steps
    stop["at"] = None
    resumed = train_amphista(model, col, LAYER, K, trim, checkpoint=ckpt, **run)
    assert starts == [0, 10] and not ckpt.exists()
    for name, value in whole.trained_state().items():
        assert torch.equal(resumed.trained_state()[name], value), name
    # a checkpoint of other settings is not resumed
    stop["at"] = 12
    with pytest.raises(_Stop):
        train_amphista(model, col, LAYER, K, trim, checkpoint=ckpt, **run)
    stop["at"] = None
    train_amphista(model, col, LAYER, K, trim, checkpoint=ckpt, **{**run, "lr": 1e-3})
    assert starts[-1] == 0 and not ckpt.exists()


def test_cli_trains_caches_and_reports_bad_input(folder, tmp_path, capsys):
    args = ["train", "amphista", str(folder), "--steps", "3", "--batch", "16", "--rank", "8",
            "--vocab", "40", "--chunks", "6", "--chunk-len", "16", "--cache", str(tmp_path),
            "--quiet"]  # fmt: skip
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "ℓ=3" in out and "chain" in out and "heads written to" in out  # 3N/4 of 4 layers
    assert sorted(trained_amphista(tmp_path, folder)) == [3]
    assert cli_main(args) == 0
    assert "cached: " in capsys.readouterr().out
    ExitHead(load_model(folder), 1).save(heads_dir(tmp_path, folder) / "exit-L1-r0-k97.pt")
    assert cli_main([*args, "--force"]) == 0  # default ℓ: the deepest trained exit head
    assert "ℓ=1" in capsys.readouterr().out
    assert sorted(trained_amphista(tmp_path, folder)) == [1, 3]
    for bad, message in ((["--heads", "0"], "heads = 0: must be >= 1"),
                         (["--layer", "9"], "layer = 9: outside [1, 3]"),
                         (["--steps", "0"], "steps = 0: must be >= 1")):  # fmt: skip
        assert cli_main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mirror-sd: error: {message}") and "Traceback" not in err
