"""Kangaroo self-draft: the written folder is an ordinary draft model whose first k layers are
the target's, training improves it on held-out chunks, and as a draft it is lossless."""

from __future__ import annotations

import random

import pytest
import torch

import mirror_sd.api as api
import mirror_sd.training.adapter as adapter
from mirror_sd.cli import main as cli_main
from mirror_sd.graphs.loader import load_model
from mirror_sd.training.adapter import train_adapter
from mirror_sd.training.adapter_folder import ADAPTER_FILE, read_provenance
from mirror_sd.training.corpus import Corpus
from tests.conftest import make_tiny, save_tiny_with_tokenizer

K = 2


def _random_corpus(n: int = 21, length: int = 48, seed: int = 0) -> Corpus:
    """Random token chunks: the tiny word-level tokenizer would turn the stdlib into <unk>."""
    rng = random.Random(seed)
    chunks = [[rng.randrange(97) for _ in range(length)] for _ in range(n)]
    return Corpus(chunks, f"random-{seed}-{n}-{length}", "random token ids (test)")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("kangaroo")
    return save_tiny_with_tokenizer(make_tiny("qwen2", seed=0, num_hidden_layers=4), root / "t")


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    out = train_adapter(target, K, steps=40, lr=1e-3, corpus=_random_corpus(), out=root / "d",
                        cache=root / "cache", progress=False)  # fmt: skip
    return out, root


def test_folder_is_the_target_truncated_plus_an_adapter(target, trained):
    out, _ = trained
    t, d = load_model(target), load_model(out)
    assert d.num_layers == K + 1
    ts, ds = t.state_dict(), d.state_dict()
    for name, value in ds.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer is None or layer < K:
            assert torch.equal(value, ts[name]), name
    # the adapter was trained away from its initialisation (target layer K or the last one)
    init = read_provenance(out)["init_layer"]
    assert not torch.equal(
        ds[f"model.layers.{K}.self_attn.q_proj.weight"],
        ts[f"model.layers.{init}.self_attn.q_proj.weight"],
    )
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_provenance_records_what_it_was_made_from(target, trained):
    p = read_provenance(trained[0])
    assert (trained[0] / ADAPTER_FILE).is_file()
    assert p["k"] == K and p["target"]["num_layers"] == 4
    assert p["target"]["identity"]["folder"] == str(target.absolute())
    assert p["corpus"]["identity"] == _random_corpus().identity and p["corpus"]["description"]
    assert p["settings"]["seed"] == 0 and p["settings"]["steps"] == 40
    assert 0 <= p["heldout_top1"] <= 1 and 0 <= p["train_top1_candidates"] <= 1
    assert p["corpus"]["heldout_chunks"] == [3, 10, 17]


def test_training_raises_heldout_agreement_and_lowers_loss(trained):
    p = read_provenance(trained[0])
    untrained = p["init_probes"][str(p["init_layer"])]["untrained"]
    assert p["heldout_ce"] < untrained["ce"]
    assert p["heldout_top1"] > untrained["top1"]


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_as_draft_it_is_lossless(target, trained, mode):
    out, root = trained
    with api.compile(target, out, onnx_dir=root / "onnx", max_len=256) as plan:
        prompt = "w1 w2 w3 w4 w5"
        ref = plan.generate(prompt, 24, mode="autoregressive")
        res = plan.generate(prompt, 24, mode=mode)
        assert res.tokens == ref.tokens
        assert res.stats.draft_device == "onnxruntime CPUExecutionProvider"


def test_same_seed_same_adapter(target, tmp_path):
    a, b = (
        train_adapter(
            target,
            1,
            steps=3,
            corpus=_random_corpus(8, 16),
            out=tmp_path / name,
            cache=tmp_path / "cache",
            progress=False,
            init="layer",
        )  # fmt: skip
        for name in ("a", "b")
    )
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_default_folder_is_cached(target, tmp_path, monkeypatch):
    kwargs = dict(steps=2, corpus=_random_corpus(8, 16), cache=tmp_path, progress=False)
    first = train_adapter(target, 1, init="last", **kwargs)
    assert first.parent == tmp_path / "adapters" and (first / ADAPTER_FILE).is_file()
    monkeypatch.setattr(adapter, "_train_best_init", lambda *a: pytest.fail("retrained"))
    assert train_adapter(target, 1, init="last", **kwargs) == first


@pytest.mark.parametrize("k", [0, -1, 4, 9])
def test_bad_k_is_a_clear_error(target, tmp_path, k):
    with pytest.raises(ValueError, match=r"1 <= k < 4"):
        train_adapter(target, k, corpus=_random_corpus(), cache=tmp_path, progress=False)


def test_refuses_to_overwrite_a_foreign_folder(target, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a self-draft"):
        train_adapter(target, 1, steps=1, corpus=_random_corpus(8, 16), out=tmp_path / "mine",
                      cache=tmp_path, progress=False)  # fmt: skip


def test_cli(target, tmp_path, capsys):
    rc = cli_main(["train", "adapter", str(target), "--layers", "1", "--steps", "2",
                   "--chunks", "4", "--chunk-len", "16", "--init", "layer", "-o",
                   str(tmp_path / "cli"), "--cache", str(tmp_path), "--quiet"])  # fmt: skip
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert load_model(tmp_path / "cli").num_layers == 2
