"""Batched generation: every sequence of a batch equals its batch-1 output, token for token.

Sequences of a batch share one packed KV cache per device (`runtime/packing.py`); these tests
run prompts of different lengths, force different accept lengths per sequence (a draft that is
the target except at some positions), force compactions with a small cache, and check that
finished sequences leave, that bad input is refused before any work, and that sampling keeps
each sequence's distribution.
"""

from __future__ import annotations

import pytest
import torch

from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.runtime.autoregressive import extend, greedy_decode
from mirror_sd.runtime.batch import is_batch
from mirror_sd.runtime.prompts import PromptTooLongError
from tests.runtime.conftest import CHI2_99_9, chi2, target_dists, tiny_model

MODES = ["autoregressive", "speculative", "mirror"]
NEAR_TIE = 1e-3  # a top-2 logit margin below this is a floating-point near-tie (runtime.md)


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [_prompt(1, 5), _prompt(2, 11), _prompt(3, 1), _prompt(4, 17), _prompt(5, 3)]


class PositionNoisyDraft(TorchRunner):
    """The target as its own draft, except that rows at positions p with p² % 7 == 2 get their
    logits rolled by one token: those drafts are rejected, so sequences at different positions
    accept different lengths in the same round."""

    def forward(self, ids, position_ids, mask):
        logits = super().forward(ids, position_ids, mask)  # (T, V)
        noisy = ((position_ids[0] * position_ids[0]) % 7 == 2).tolist()
        return torch.stack([r.roll(1) if n else r for r, n in zip(logits, noisy, strict=True)])


def assert_same(model, prompt: list[int], out: list[int], ref: list[int], what: str) -> None:
    """out == ref, or a failure that says whether the first difference is a near-tie."""
    if out == ref:
        return
    i = next(
        (k for k, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b),
        min(len(out), len(ref)),
    )
    logits = extend(model, model.new_cache(512), prompt + ref[:i])[-1]
    top = logits.topk(2).values
    margin = float(top[0] - top[1])
    kind = "a floating-point near-tie" if margin < NEAR_TIE else "a bug"
    pytest.fail(f"{what}: differs at token {i} (top-2 margin {margin:.2e}: {kind})")


@pytest.fixture
def models(tmp_path):
    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)
    return target, draft


def test_is_batch_tells_prompts_from_one_prompt():
    assert is_batch(["a", "b"]) and is_batch([[1, 2], [3]]) and is_batch([[{"role": "user"}]])
    assert not is_batch([1, 2, 3]) and not is_batch("text") and not is_batch([])
    assert not is_batch([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("mode", MODES)
def test_every_sequence_equals_its_batch1_output(models, plan_factory, mode, size):
    target, _ = models
    noisy = PositionNoisyDraft(target, TorchDevice(), 512, name="draft")
    plan = plan_factory(target, None, draft_runner=noisy, mode=mode, num_draft_tokens=3)
    prompts = PROMPTS[:size]
    results = plan.generate(prompts, 20)
    assert isinstance(results, list) and len(results) == size
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        single = plan.generate(prompt, 20)
        assert_same(target, prompt, res.tokens, single.tokens, f"{mode} B={size} prompts[{i}]")
        assert_same(target, prompt, res.tokens, greedy_decode(target, prompt, 20), "greedy")
        assert res.prompt_tokens == len(prompt) and res.batch.size == size
    if mode == "speculative" and size > 1:  # the noisy draft makes accept lengths ragged
        by_round = zip(*(r.rounds for r in results), strict=False)
        assert any(len({r.accepted for r in rnd}) > 1 for rnd in by_round)
        assert any(r.accepted > 0 for res in results for r in res.rounds)


@pytest.mark.parametrize("mode", MODES)
def test_batch_with_a_model_draft_and_a_small_cache_compacts(models, plan_factory, mode):
    """A random draft (mostly rejected: many holes) and a cache just big enough for the batch:
    holes are squeezed out (compactions) and every sequence still equals greedy."""
    target, draft = models
    slack = {"autoregressive": 1, "speculative": 5, "mirror": (1 + 8) * 5 + 1}[mode]  # rows
    need = sum(len(p) + 24 + slack for p in PROMPTS)
    plan = plan_factory(target, draft, mode=mode, num_draft_tokens=4, max_len=need)
    results = plan.generate(PROMPTS, 24)
    for i, (prompt, res) in enumerate(zip(PROMPTS, results, strict=True)):
        assert_same(target, prompt, res.tokens, greedy_decode(target, prompt, 24), f"[{i}]")
    if mode == "speculative":
        assert results[0].batch.compactions > 0 and results[0].batch.moved_rows > 0


def test_self_speculation_in_a_batch_accepts_everything(models, plan_factory):
    target, _ = models
    plan = plan_factory(target, target, mode="speculative", num_draft_tokens=3)
    results = plan.generate(PROMPTS[:3], 16)
    for prompt, res in zip(PROMPTS[:3], results, strict=True):
        assert res.tokens == greedy_decode(target, prompt, 16)
        assert res.stats.rounds == 4 and res.stats.mean_accepted == 4.0


def test_finished_sequences_leave_the_batch(models, plan_factory):
    """Each sequence stops at its own EOS; it leaves (no more rounds) and the rest go on."""
    target, draft = models
    plan = plan_factory(target, draft, mode="speculative", num_draft_tokens=3)
    refs = [greedy_decode(target, p, 30) for p in PROMPTS[:3]]
    eos = refs[1][4]  # the middle sequence ends early
    results = plan.generate(PROMPTS[:3], 30, eos_token_id=eos)
    for ref, res in zip(refs, results, strict=True):
        expect = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert res.tokens == expect
    short = results[1]
    assert len(short.tokens) == refs[1].index(eos) + 1 < 30
    assert len(short.rounds) < max(len(r.rounds) for r in results)
    assert short.stats.wall_s <= results[0].batch.wall_s  # its latency ends when it leaves
    assert plan.target.length <= sum(len(p) + 30 + 4 for p in PROMPTS[:3])


def test_stop_strings_end_each_sequence(models, plan_factory):
    target, _ = models
    plan = plan_factory(target, None, mode="autoregressive")
    refs = [greedy_decode(target, p, 20) for p in PROMPTS[:2]]
    stop = f" {refs[0][2]}"  # IdTokenizer decodes ids as " <id>"
    results = plan.generate(PROMPTS[:2], 20, stop_strings=[stop])
    for ref, res in zip(refs, results, strict=True):
        text = ""
        for k, t in enumerate(ref):
            text += f" {t}"
            if stop in text:
                ref = ref[: k + 1]
                break
        assert res.tokens == ref


def test_invalid_prompt_is_named_before_any_work(models, plan_factory):
    target, draft = models
    plan = plan_factory(target, draft, mode="speculative")
    with pytest.raises(ValueError, match=r"prompts\[1\]: .*token id 500 is outside"):
        plan.generate([[1, 2], [3, 500], [4]], 8)
    with pytest.raises(ValueError, match=r"prompts\[2\]: .*empty"):
        plan.generate([[1, 2], [3], []], 8)
    assert plan.target.length == 0 and plan.draft.length == 0  # nothing ran
    with pytest.raises(PromptTooLongError, match="batch of 3 prompts"):
        plan.generate([[1] * 100] * 3, 100, max_len=512)
    with pytest.raises(ValueError, match="seed"):
        plan.generate([[1], [2]], 4, seed=[1])


def test_mirror_batch_self_speculation_hits_and_accepts_everything(models, plan_factory):
    """draft = target in mirror mode: every draft token is accepted only if each hit branch's
    rows, handed to its sequence without a copy, are exactly the draft cache batch 1 would
    hold; rounds that start from a reused branch must occur."""
    target, _ = models
    plan = plan_factory(target, target, mode="mirror", num_draft_tokens=3, exit_top_k=8)
    results = plan.generate(PROMPTS[:3], 16)
    for prompt, res in zip(PROMPTS[:3], results, strict=True):
        assert res.tokens == greedy_decode(target, prompt, 16)
        assert res.stats.rounds == 4 and res.stats.mean_accepted == 4.0
    assert sum(r.hit is True for res in results for r in res.rounds) >= 3
    assert any(r.source == "branch" for res in results for r in res.rounds)
    assert plan.generate([1, 2], 4).stats.mode == "mirror"  # one prompt: one result, as before


def test_mirror_batch_full_candidate_set_hits_every_round(models, plan_factory):
    """κ = V and a budget covering every branch: each sequence's verdict is always a rolled-out
    branch (batch 1's property), with a random draft and ragged accept lengths."""
    target, draft = models
    plan = plan_factory(target, draft, mode="mirror", num_draft_tokens=2, exit_top_k=97,
                        branch_budget=3 * 97, max_len=4096)  # fmt: skip
    results = plan.generate(PROMPTS[:3], 12)
    for prompt, res in zip(PROMPTS[:3], results, strict=True):
        assert res.tokens == greedy_decode(target, prompt, 12)
        assert res.stats.hit_rate == 1.0 and all(r.hit for r in res.rounds)


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_sampling_keeps_each_sequence_distribution(tmp_path, plan_factory, mode):
    """χ² over batched samples: each sequence of a batch of 3 follows the target's law
    (mirror: κ = V, so rounds start from reused branches)."""
    v = 6
    small = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3, **small)
    draft = tiny_model(tmp_path, "llama", seed=9, num_hidden_layers=1, **small)
    plan = plan_factory(target, draft, exit_layer=2, mode=mode, num_draft_tokens=2,
                        exit_top_k=v, branch_budget=3 * v, temperature=1.0)  # fmt: skip
    prompt = [1, 2, 3]
    joint, third = target_dists(target, prompt, v)
    pairs = torch.zeros(v, v, dtype=torch.double)
    thirds = torch.zeros(v, dtype=torch.double)
    reused = 0
    for k in range(500):
        for res in plan.generate([prompt] * 3, 3, seed=3 * k):
            a, b, c = res.tokens
            pairs[a, b] += 1
            thirds[c] += 1
            reused += sum(r.source == "branch" for r in res.rounds)
    assert mode != "mirror" or reused > 150, "the test must exercise reused branches"
    assert chi2(pairs.flatten(), joint.flatten()) < CHI2_99_9[35]
    assert chi2(thirds, third) < CHI2_99_9[5]
    d_joint, _ = target_dists(draft, prompt, v)  # power: the draft's law is rejected
    assert chi2(pairs.flatten(), d_joint.flatten()) > CHI2_99_9[35]


@pytest.mark.parametrize("fault", ["raise", "hang", "malformed"])
@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_draft_failure_in_a_batch_keeps_every_output(models, plan_factory, fault, mode):
    """A draft that fails mid-batch drops the whole batch to target-only, tokens unchanged."""
    from tests.runtime.test_faults import faulty_plan

    target, draft = models
    runner, plan = faulty_plan(plan_factory, target, draft, fault, mode)
    with pytest.warns(UserWarning, match="target-only"):
        results = plan.generate(PROMPTS[:3], 16)
    for prompt, res in zip(PROMPTS[:3], results, strict=True):
        assert res.tokens == greedy_decode(target, prompt, 16) and res.stats.fallback
    assert bool(plan.draft_disabled) == (fault == "hang")
    runner.release.set()  # let an abandoned worker finish


def test_stream_takes_one_prompt(models, plan_factory):
    plan = plan_factory(models[0], None, mode="autoregressive")
    with pytest.raises(ValueError, match=r"generate\(\[\.\.\.\]\)"):
        next(plan.stream([[1, 2], [3]], 4))


def test_per_prompt_budgets_sampling_and_stops(models, plan_factory):
    """max_new_tokens, temperature and stop_strings per prompt: the greedy sequences equal
    greedy decoding, the sampled one equals batch 1 with its seed (seed + i), draw for draw."""
    target, draft = models
    plan = plan_factory(target, draft, mode="speculative", num_draft_tokens=3)
    prompts = PROMPTS[:3]
    refs = [greedy_decode(target, p, 12) for p in prompts]
    stop = f" {refs[2][3]}"
    results = plan.generate(prompts, [5, 12, 12], temperature=[0.0, 1.0, 0.0],
                            stop_strings=[[], [], [stop]], seed=7)  # fmt: skip
    assert results[0].tokens == refs[0][:5]
    sampled = plan.generate(prompts[1], 12, temperature=1.0, seed=8)
    assert results[1].tokens == sampled.tokens
    cut = next(k for k in range(12) if stop in "".join(f" {t}" for t in refs[2][: k + 1]))
    assert results[2].tokens == refs[2][: cut + 1]
    with pytest.raises(ValueError, match=r"max_new_tokens: .*one per prompt \(3\), got 2"):
        plan.generate(prompts, [5, 6])
    with pytest.raises(ValueError, match="temperature"):
        plan.generate(prompts, 4, temperature=[0.0, -1.0, 0.0])


def test_sequences_join_a_running_batch(models, plan_factory):
    """Continuous batching at the scheduler: sequences admitted after rounds 2 and 5 are
    prefilled into free columns and decode exactly like batch 1 beside the running ones."""
    from mirror_sd.runtime.acceptance import Sampling

    target, draft = models
    plan = plan_factory(target, draft, mode="speculative", num_draft_tokens=3)
    spec = plan.spec.with_(mode="speculative")

    def seq(i: int):
        return plan.sequence(i, PROMPTS[i], 12, Sampling(), i, spec)

    sched = plan.scheduler(spec, plan.settings(spec))
    arrivals = {2: [seq(2)], 5: [seq(3), seq(4)]}
    calls = iter(range(100))
    seqs = [seq(0), seq(1)]
    everyone = seqs + arrivals[2] + arrivals[5]
    for _ in sched.run(seqs, lambda s: False, admit=lambda: arrivals.get(next(calls), [])):
        pass
    for s in everyone:
        assert s.produced == greedy_decode(target, PROMPTS[s.index], 12), f"sequence {s.index}"
    assert everyone[4].finished_at > max(s.finished_at for s in everyone[:2])  # joined late


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
@pytest.mark.parametrize("source", ["sam", "pld"])
def test_retrieval_sources_run_in_batches(models, plan_factory, mode, source):
    """Every sequence gets its own fork of the plan's retrieval source: each equals its batch-1
    tokens (greedy and sampled) and greedy decoding, and retrieval proposes rounds."""
    target, draft = models
    plan = plan_factory(target, draft, mode=mode, num_draft_tokens=3, retrieval=source,
                        retrieval_min_match=1)  # fmt: skip
    repetitive = [[5, 6, 7, 8] * 4, PROMPTS[1] * 2, [9, 10] * 6]
    results = plan.generate(repetitive, 20)
    for i, (prompt, res) in enumerate(zip(repetitive, results, strict=True)):
        assert res.tokens == plan.generate(prompt, 20).tokens, f"prompts[{i}]"
        assert_same(target, prompt, res.tokens, greedy_decode(target, prompt, 20), f"[{i}]")
    assert any(r.source.startswith(source) for res in results for r in res.rounds)
    sampled = plan.generate(repetitive, 12, temperature=1.0, seed=4)
    for i, prompt in enumerate(repetitive):
        alone = plan.generate(prompt, 12, temperature=1.0, seed=4 + i)
        assert sampled[i].tokens == alone.tokens, f"sampled prompts[{i}]"


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_a_batch_decodes_autoregressively_where_the_policy_says_so(models, plan_factory, mode):
    """A plan whose policy says autoregressive from 4 live sequences: a batch of 4 drafts
    nothing, batch 1 drafts; greedy output unchanged either way."""
    from mirror_sd.partition.batch_policy import choose_per_batch
    from tests.partition.test_batch_policy import batch_profile

    target, draft = models
    plan = plan_factory(target, draft, mode=mode, num_draft_tokens=3)
    plan.batch_policy = choose_per_batch(batch_profile(0.05), mode, 3)  # B >= 4: autoregressive
    assert [s.mode for s in plan.batch_policy][-2:] == ["autoregressive"] * 2
    prompts = [[1 + i, 2, 3 + i] for i in range(4)]
    results = plan.generate(prompts, 12)
    for p, r in zip(prompts, results, strict=True):
        assert r.tokens == greedy_decode(target, p, 12)
        assert all(x.source == "target" for x in r.rounds[:1])  # 4 live: no drafting
    alone = plan.generate(prompts[0], 12)  # batch 1: the plan's mode drafts
    assert alone.tokens == results[0].tokens and any(x.drafted for x in alone.rounds)
