"""Speculative streaming in the draft: stream rows in the torch and ONNX drafts, a streamed
chain that proposes exactly what the one-token chain proposes (greedy and sampled) in fewer
forwards when its guesses hold, and plans with stream rows that stay lossless."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.devices.ort_core import OrtDevice
from mirror_sd.devices.ort_device import OrtRunner
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.graphs.export import export_cached
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.streams import StreamTable, add_streams_onnx, with_streams
from mirror_sd.runtime.acceptance import Sampling
from mirror_sd.runtime.autoregressive import greedy_decode
from mirror_sd.runtime.draft_engine import DraftEngine
from tests.runtime.conftest import (
    CHI2_99_9,
    chi2,
    make_plan,
    sample_counts,
    target_dists,
    tiny_model,
)

V = 97


def _table(model, k: int = 2, seed: int = 0) -> StreamTable:
    g = torch.Generator().manual_seed(seed)
    return StreamTable(torch.randn(k, model.config.hidden_size, generator=g) * 0.1, V)


class OracleRunner:
    """A draft runner whose stream rows guess from `oracle` (token at each position): the
    guess of a stream row at position p is oracle[p + 1]; everything else is the runner's."""

    def __init__(self, runner, oracle: list[int]):
        self.inner, self.oracle = runner, oracle
        self.stream_rows = 0  # stream rows fed so far

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, ids, position_ids, mask):
        logits = self.inner.forward(ids, position_ids, mask).clone()
        for r, (tok, p) in enumerate(zip(ids[0].tolist(), position_ids[0].tolist(), strict=True)):
            self.stream_rows += tok >= V
            if tok >= V and p + 1 < len(self.oracle):
                logits[r] = -1e4
                logits[r, self.oracle[p + 1]] = 1e4
        return logits


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("d"), seed=1, num_hidden_layers=2)


def test_stream_rows_leave_real_tokens_alone_and_read_the_table(draft):
    table = _table(draft)
    streamed = with_streams(draft, table)
    assert streamed.model.embed_tokens.base is draft.model.embed_tokens  # no weight copy
    ids = torch.tensor([[5, 9, 31, V, V + 1]])
    emb = streamed.embed(ids)
    torch.testing.assert_close(emb[0, :3], draft.embed(ids[:, :3])[0], rtol=0, atol=0)
    torch.testing.assert_close(emb[0, 3:], table.rows, rtol=0, atol=0)
    assert draft.model.embed_tokens.num_embeddings == V  # the original is untouched
    with pytest.raises(ValueError, match="train streams for this draft"):
        with_streams(draft, StreamTable(torch.zeros(2, 8), V))


def test_a_table_round_trips_and_a_missing_one_says_how_to_make_it(tmp_path, draft):
    table = _table(draft, k=3)
    loaded = StreamTable.load(table.save(tmp_path / "s"))
    torch.testing.assert_close(loaded.rows, table.rows)
    assert (loaded.k, loaded.vocab_size, loaded.ids()) == (3, V, [V, V + 1, V + 2])
    assert loaded.identity() == table.identity()
    with pytest.raises(FileNotFoundError, match="mirror-sd train streams"):
        StreamTable.load(tmp_path / "nothing")


def _engine(model, streams=(), oracle=None):
    runner = TorchRunner(model, TorchDevice(), 256, name="draft")
    return DraftEngine(OracleRunner(runner, oracle) if oracle else runner, streams=streams)


def _rounds(engine, prompts, sampling, seed, gamma=5, rounds=4):
    """Drafts of several rounds; after each, the sequence commits 2 draft tokens and one
    token of its own (a partial acceptance, so the cache rolls back)."""
    committed = {i: list(p) for i, p in enumerate(prompts)}
    for i, p in committed.items():
        engine.add(i, sampling, torch.Generator().manual_seed(seed + i), p)
    out = []
    for r in range(rounds):
        drafts = engine.chain({i: list(c) for i, c in committed.items()}, gamma)
        out.append({i: d.tokens for i, d in drafts.items()})
        for i, d in drafts.items():
            committed[i] += d.tokens[:2] + [(7 * r + i) % V]
    return out, drafts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_streamed_chain_proposes_the_one_token_chain(draft, temperature):
    """Random (untrained) stream rows: guesses mostly miss; the proposals are the plain
    chain's anyway, for two sequences in one batch, greedy and sampled (same generators)."""
    table = _table(draft)
    sampling = Sampling(temperature=temperature)
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1]]
    plain, d_plain = _rounds(_engine(draft), prompts, sampling, seed=11)
    streamed, d_streamed = _rounds(_engine(with_streams(draft, table), table.ids()), prompts,
                                   sampling, seed=11)  # fmt: skip
    assert streamed == plain
    if temperature:
        for i in d_plain:
            torch.testing.assert_close(d_streamed[i].q, d_plain[i].q, rtol=1e-4, atol=1e-6)


def test_right_guesses_save_forwards(draft):
    """Stream rows that guess the plain chain's tokens: the same proposals in fewer draft
    forwards (γ = 6, 2 streams: a first forward, then up to 3 tokens per forward)."""
    prompt = [3, 1, 4, 1, 5, 9]
    plain = _engine(draft)
    plain.add(0, Sampling(), torch.Generator(), prompt)
    want = plain.chain({0: prompt}, 6)[0].tokens
    table = _table(draft)
    streamed = _engine(with_streams(draft, table), table.ids(), oracle=prompt + want)
    streamed.add(0, Sampling(), torch.Generator(), prompt)
    got = streamed.chain({0: prompt}, 6)[0].tokens
    assert got == want
    assert plain.forwards == 6
    assert streamed.forwards == 3  # 1 token, then 3 (two guesses held), then the last 2
    assert streamed.drafted == 6
    # the cache holds the prompt and d_1..d_5 (d_6 unfed), as after the plain chain
    assert streamed.rows(0) == plain.rows(0) == prompt + want[:5]


@pytest.fixture(scope="module")
def onnx_drafts(tmp_path_factory, draft):
    root = tmp_path_factory.mktemp("onnx")
    return {q: export_cached(draft, root, {"test": "streams"}, quantize=q) for q in (None, "int8")}


@pytest.mark.parametrize("quant", [None, "int8"])
def test_onnx_draft_reads_stream_rows(draft, onnx_drafts, quant):
    table = _table(draft)
    path = add_streams_onnx(onnx_drafts[quant], table)
    assert (
        path.parent == onnx_drafts[quant].parent
        and add_streams_onnx(onnx_drafts[quant], table) == path
    )
    ids = torch.tensor([[5, 9, 31, V, V + 1]])
    pos = torch.arange(5)[None]
    mask = causal_mask(0, 5)

    def run(p, x):
        runner = OrtRunner(p, OrtDevice(intra_op_threads=1), 64)
        return runner.forward(x, pos[:, : x.shape[1]], mask[:, : x.shape[1], : x.shape[1]])

    real = run(onnx_drafts[quant], ids[:, :3])
    mixed = run(path, ids)
    torch.testing.assert_close(mixed[:3], real, rtol=0, atol=0)  # real rows: bit for bit
    if quant is None:  # the stream rows compute what the torch draft with the table does
        cache = with_streams(draft, table).new_cache(64)
        ref = with_streams(draft, table)(ids, pos, mask, cache)[0]
        torch.testing.assert_close(mixed, ref, rtol=1e-4, atol=1e-4)
    else:
        assert torch.isfinite(mixed).all() and not torch.equal(mixed[3], mixed[2])


def _stream_plan(target, draft, table, oracle=None, **spec):
    runner = TorchRunner(with_streams(draft, table), TorchDevice(), 512, name="draft")
    plan = make_plan(target, None, draft_runner=OracleRunner(runner, oracle) if oracle else runner,
                     draft_streams="table", **spec)  # fmt: skip
    plan.draft_streams = table.ids()
    return plan


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_greedy_plans_with_streams_match_the_target(tmp_path, draft, mode):
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=4)
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8], [9, 9, 2]]
    want = [greedy_decode(target, p, 24) for p in prompts]
    table = _table(draft)
    plan = _stream_plan(target, draft, table, mode=mode, num_draft_tokens=5)
    try:
        got = [r.tokens for r in plan.generate(prompts, 24)]  # one batch
        alone = plan.generate(prompts[0], 24).tokens
    finally:
        plan.close()
    assert got == want and alone == want[0]
    # guesses from the target's own output: they hold where the draft agrees with it
    oracle = prompts[0] + want[0]
    plan = _stream_plan(target, draft, table, oracle=oracle, mode=mode, num_draft_tokens=5)
    try:
        assert plan.generate(prompts[0], 24).tokens == want[0]
    finally:
        plan.close()
    assert plan.draft.stream_rows > 0  # the plan's chain fed stream rows


def test_sampling_stays_lossless_with_streams(tmp_path):
    """Speculative mode, temperature 1, a 6-token vocabulary: the joint law of the first two
    tokens and the law of the third are the target's with stream rows in the draft."""
    v = 6
    small = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3, **small)
    draft = tiny_model(tmp_path, "llama", seed=9, num_hidden_layers=1, **small)
    table = StreamTable(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)), v)
    plan = _stream_plan(target, draft, table, mode="speculative", num_draft_tokens=3,
                        temperature=1.0)  # fmt: skip
    prompt = [1, 2, 3]
    joint, third = target_dists(target, prompt, v)
    pairs, thirds = sample_counts(plan, prompt, v)
    assert chi2(pairs.flatten(), joint.flatten()) < CHI2_99_9[35]
    assert chi2(thirds, third) < CHI2_99_9[5]


def test_a_call_can_turn_streams_off_but_not_on(tmp_path, draft):
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=4)
    table, prompt = _table(draft), [3, 1, 4, 1, 5]
    want = greedy_decode(target, prompt, 16)
    plan = _stream_plan(target, draft, table, oracle=prompt + want, mode="speculative",
                        num_draft_tokens=4)  # fmt: skip
    try:
        assert plan.generate(prompt, 16, draft_streams="none").tokens == want
        assert plan.draft.stream_rows == 0
        assert plan.generate(prompt, 16).tokens == want
        assert plan.draft.stream_rows > 0
    finally:
        plan.close()
    plain = make_plan(target, draft, mode="speculative")
    try:
        with pytest.raises(ValueError, match="compile with speculation.draft_streams"):
            plain.generate(prompt, 4, draft_streams="trained")
    finally:
        plain.close()
