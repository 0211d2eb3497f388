"""Draft-length policies (Kangaroo confidence, SVIP entropy): decisions, the shorter blocks they
produce, the draft cache after committing an early-stopped branch, and losslessness."""

import math

import pytest
import torch

from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.partition import DeviceMapError, SpecConfig, load_device_map
from mirror_sd.runtime.acceptance import Sampling
from mirror_sd.runtime.autoregressive import extend, greedy_decode
from mirror_sd.runtime.branches import Branch
from mirror_sd.runtime.draft_engine import DraftEngine
from mirror_sd.runtime.draft_policy import NEVER_STOP, DraftPolicy, entropy
from tests.runtime.conftest import CHI2_99_9, chi2, target_dists, tiny_model

V = 6  # vocabulary of the sampling test's tiny models

# --- the decision on hand-made distributions ----------------------------------------------


def test_confidence_stops_when_top1_falls_below_the_threshold():
    q = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.5, 0.25, 0.25]])
    assert DraftPolicy("confidence", 0.5).stops(q).tolist() == [
        False,
        True,
        False,
    ]  # 0.5: not below
    assert DraftPolicy("confidence", 0.7).stops(q).tolist() == [True, True, True]
    assert DraftPolicy("confidence", 0.3).stops(q).tolist() == [False, False, False]


def test_entropy_stops_when_entropy_in_nats_exceeds_the_threshold():
    uniform4 = torch.full((4,), 0.25)
    one_hot = torch.tensor([0.0, 1.0, 0.0, 0.0])  # zero-probability tokens contribute 0, no NaN
    q = torch.stack([uniform4, one_hot])
    assert entropy(q).tolist() == pytest.approx([math.log(4), 0.0])
    assert DraftPolicy("entropy", 1.0).stops(q).tolist() == [True, False]
    assert DraftPolicy("entropy", 1.5).stops(q).tolist() == [False, False]
    assert DraftPolicy("entropy", 0.0).stops(one_hot).tolist() is False  # 0 nats is not above 0


def test_none_never_stops_and_logits_mean_their_softmax():
    uniform = torch.full((3, 50), 1 / 50)
    assert not NEVER_STOP.active and DraftPolicy("entropy", 1.0).active
    assert NEVER_STOP.stops(uniform).tolist() == [False] * 3
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits, -1)
    top1, h = p.max(-1).values, entropy(p)
    for policy in (  # thresholds between the rows' values: the comparison has teeth
        DraftPolicy("confidence", float(top1.sort().values[2:4].mean())),
        DraftPolicy("entropy", float(h.sort().values[2:4].mean())),
    ):
        expected = policy.stops(p)
        assert int(expected.sum()) == 3
        assert torch.equal(policy.stops_logits(logits), expected)
    with pytest.raises(ValueError, match="expected one of none, confidence, entropy"):
        DraftPolicy("kangaroo", 0.5)


# --- the draft engine ---------------------------------------------------------------------


class Scripted:
    """A stand-in policy: call i stops exactly the rows in script[i] (rows of the fed batch)."""

    active = True

    def __init__(self, script: list[set[int]]):
        self.script, self.calls = script, 0

    def stops_logits(self, logits: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(logits.shape[0], dtype=torch.bool)
        out[list(self.script[self.calls])] = True
        self.calls += 1
        return out

    stops = stops_logits


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("d"), "llama", seed=7, num_hidden_layers=2)


def _engine(model, sampling: Sampling | None = None, seed: int = 0) -> DraftEngine:
    """An engine following one sequence, id 0."""
    runner = TorchRunner(model, TorchDevice(), 256, name="draft")
    engine = DraftEngine(runner)
    engine.add(0, sampling or Sampling(), torch.Generator().manual_seed(seed))
    return engine


def _chain(engine: DraftEngine, gamma: int, policy=NEVER_STOP):
    return engine.chain({0: COMMITTED}, gamma, policy)[0]


COMMITTED = [3, 14, 15, 92, 65, 35]


def test_draft_chain_stops_early_and_keeps_the_stopping_token(draft_model):
    ref = greedy_decode(draft_model, COMMITTED, 4)
    eng = _engine(draft_model)
    d = _chain(eng, 4, Scripted([set(), {0}]))  # stop after the 2nd token
    assert d.tokens == ref[:2] and d.q is None
    assert eng.rows(0) == COMMITTED + ref[:1]  # the stopping token is proposed, never fed
    always = DraftPolicy("confidence", 0.999)  # a random tiny draft is never that sure
    assert _chain(eng, 4, always).tokens == ref[:1]  # at least one token
    assert _chain(eng, 4).tokens == ref  # no policy: γ tokens


def test_draft_chain_sampling_keeps_one_q_row_per_token(draft_model):
    eng = _engine(draft_model, Sampling(temperature=1.0), seed=3)
    d = _chain(eng, 4, Scripted([set(), set(), {0}]))
    assert len(d.tokens) == 3 and d.q.shape == (3, draft_model.config.vocab_size)
    assert all(float(d.q[i, t]) > 0 for i, t in enumerate(d.tokens))
    assert torch.allclose(d.q.sum(-1), torch.ones(3))


def _branches(block: list[int]) -> list[Branch]:
    """Corrections at depths 0, 1 and γ (bonus), never equal to the next draft token."""
    pick = [t for t in (7, 8, 9) if t not in block]
    return [
        Branch(0, pick[0], 0.4),
        Branch(1, pick[1], 0.3),
        Branch(len(block), pick[0], 0.2),
        Branch(len(block), pick[2], 0.1),
    ]


# per step, the rows (of the still-active batch) that stop: branch 1 stops after 1 token,
# branch 0 after 2 (row 0 of the 3 still active), branches 2 and 3 run the full γ = 4
SCRIPT = [{1}, {0}, set(), set()]
LENGTHS = [2, 1, 4, 4]


@pytest.mark.parametrize("block_len", [4, 2])  # 2: a block shorter than γ (an earlier stop)
def test_rollout_bounds_each_branch_and_commit_equals_a_fresh_run(draft_model, block_len):
    eng = _engine(draft_model)
    block = greedy_decode(draft_model, COMMITTED, block_len)
    branches = _branches(block)
    calls = []
    forward = eng.runner.forward
    eng.runner.forward = lambda ids, *a: calls.append(ids.shape[1]) or forward(ids, *a)
    for k, br in enumerate(branches):
        calls.clear()
        rollouts = eng.rollout({0: (COMMITTED, block, branches)}, 4, Scripted(SCRIPT))[0]
        context = COMMITTED + block[: br.depth] + [br.token]
        # the batch shrinks: 4 branches (+ chain rows), then 3, then 2, 2
        assert calls[1:] == [3, 2, 2]
        for r, m in zip(rollouts, LENGTHS, strict=True):
            assert len(r.draft.tokens) == len(r.rows) == m
        r = rollouts[k]
        assert r.draft.tokens == greedy_decode(draft_model, context, LENGTHS[k])
        eng.commit_branch(0, len(COMMITTED), br.depth, r)
        eng.end_rollouts()  # the other branches' rows become holes
        path = context + r.draft.tokens[:-1]
        assert eng.rows(0) == path and len(eng.cache.cols[0]) == len(path)
        nxt = r.draft.tokens[-1]
        fresh = extend(draft_model, draft_model.new_cache(256), path + [nxt])[-1]
        assert torch.allclose(eng.cache.forward({0: [nxt]})[0][-1], fresh, atol=1e-4)


def test_rollout_sampling_q_rows_match_the_kept_tokens(draft_model):
    eng = _engine(draft_model, Sampling(temperature=1.0), seed=5)
    block = greedy_decode(draft_model, COMMITTED, 4)
    rollouts = eng.rollout({0: (COMMITTED, block, _branches(block))}, 4, Scripted(SCRIPT))[0]
    for r, m in zip(rollouts, LENGTHS, strict=True):
        assert len(r.draft.tokens) == m and r.draft.q.shape == (m, draft_model.config.vocab_size)
        assert all(float(r.draft.q[i, t]) > 0 for i, t in enumerate(r.draft.tokens))


# --- end to end: greedy output unchanged, shorter drafts ----------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("m")
    target = tiny_model(tmp, "qwen2", seed=0, num_hidden_layers=4)
    return target, tiny_model(tmp, "qwen2", seed=1, num_hidden_layers=2)


def _prompt(seed: int, n: int = 6, vocab: int = 97) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _quantile_threshold(model, kind: str, q: float, prompt: list[int]) -> float:
    """A threshold at quantile q of the draft's own top-1 / entropy statistic along its greedy
    run from `prompt`, so the policy stops on some steps and not others (random tiny models
    are nearly uniform: absolute thresholds like 0.6 would stop on every token)."""
    p = torch.softmax(
        extend(model, model.new_cache(64), prompt + greedy_decode(model, prompt, 30)), -1
    )
    stat = p.max(-1).values if kind == "confidence" else entropy(p)
    return float(torch.quantile(stat, q))


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
@pytest.mark.parametrize("kind", ["confidence", "entropy"])
def test_greedy_output_unchanged_and_drafts_shorter(models, plan_factory, mode, kind):
    target, draft = models
    none = plan_factory(target, draft, mode=mode, num_draft_tokens=4)
    for seed in range(2):
        prompt = _prompt(seed, n=4 + seed)
        ref = greedy_decode(target, prompt, 24)
        base = none.generate(prompt, 24)
        assert base.tokens == ref and base.stats.mean_drafted == 4.0
        for quantile in (0.3, 0.7):
            th = _quantile_threshold(draft, kind, quantile, prompt)
            plan = plan_factory(target, draft, mode=mode, num_draft_tokens=4, draft_stop=kind,
                                draft_stop_threshold=th)  # fmt: skip
            res = plan.generate(prompt, 24)
            assert res.tokens == ref, f"{kind} {th:.4f} {mode} seed={seed}"
            drafted = [r.drafted for r in res.rounds]
            assert all(1 <= n <= 4 for n in drafted)
            assert res.stats.mean_drafted == pytest.approx(sum(drafted) / len(drafted))
            assert res.stats.mean_drafted < base.stats.mean_drafted


@pytest.mark.parametrize("kind", ["confidence", "entropy"])
def test_self_speculation_with_every_branch_hits_on_short_blocks(tmp_path, plan_factory, kind):
    """draft = target and κ = V: every round after the first starts from a reused branch whose
    rollout the policy cut short, so committing early-stopped branches is exercised each
    round; the output must still be the target's greedy output."""
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3)
    prompt = _prompt(4)
    th = _quantile_threshold(target, kind, 0.5, prompt)
    plan = plan_factory(target, target, exit_layer=2, mode="mirror", num_draft_tokens=3,
                        exit_top_k=97, branch_budget=4 * 97, max_len=2048, draft_stop=kind,
                        draft_stop_threshold=th)  # fmt: skip
    res = plan.generate(prompt, 30)
    assert res.tokens == greedy_decode(target, prompt, 30)
    branch_rounds = [r for r in res.rounds if r.source == "branch"]
    assert len(branch_rounds) == len(res.rounds) - 1
    assert any(r.drafted < 3 for r in branch_rounds) and any(r.drafted > 1 for r in res.rounds)
    # draft = target accepts every proposed token: each round commits its block + a bonus
    assert all(r.committed == r.drafted + 1 for r in res.rounds[:-1])


# --- sampling stays lossless --------------------------------------------------------------


def test_sampling_with_entropy_policy_matches_target_distribution(tmp_path, plan_factory):
    """The chi-square harness of test_lossless_sampling, smaller, with an entropy stop.

    The threshold is the median of the draft's entropy one sampled token after the prompt,
    so the stop depends on which token was sampled: lengths vary within chains and branches.
    """
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3, **small)
    draft = tiny_model(tmp_path, "llama", seed=9, num_hidden_layers=1, **small)
    prompt = [1, 2, 3]
    depth1 = [extend(draft, draft.new_cache(16), prompt + [a])[-1] for a in range(V)]
    th = float(entropy(torch.softmax(torch.stack(depth1).float(), -1)).median())
    plan = plan_factory(target, draft, exit_layer=2, mode="mirror", num_draft_tokens=3,
                        exit_top_k=V, branch_budget=4 * V, temperature=1.0, draft_stop="entropy",
                        draft_stop_threshold=th)  # fmt: skip
    joint, third = target_dists(target, prompt, V)
    n = 400
    pairs = torch.zeros(V, V, dtype=torch.double)
    thirds = torch.zeros(V, dtype=torch.double)
    short = reused = rounds = 0
    for seed in range(n):
        res = plan.generate(prompt, 3, seed=seed)
        a, b, c = res.tokens
        pairs[a, b] += 1
        thirds[c] += 1
        short += sum(r.drafted < 3 for r in res.rounds)
        rounds += len(res.rounds)
        reused += sum(r.source == "branch" for r in res.rounds)
    assert rounds // 5 < short < rounds, "must exercise early stops (and full-length drafts)"
    assert reused > n // 10, "must exercise rounds that start from a reused branch"
    assert chi2(pairs.flatten(), joint.flatten()) < CHI2_99_9[35]
    assert chi2(thirds, third) < CHI2_99_9[5]
    d_joint, _ = target_dists(draft, prompt, V)  # power: the draft's own distribution is rejected
    assert chi2(pairs.flatten(), d_joint.flatten()) > CHI2_99_9[35]


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"draft_stop": "kangaroo"}, r"speculation.draft_stop 'kangaroo': expected one of none, "),
        (
            {"draft_stop": "confidence"},
            r"in \(0, 1\) with draft_stop 'confidence'.*typical 0.5-0.8",
        ),
        ({"draft_stop": "confidence", "draft_stop_threshold": 1.0}, r"got 1.0"),
        (
            {"draft_stop": "entropy", "draft_stop_threshold": -1.0},
            r"> 0 nats with draft_stop 'entropy'",
        ),
        ({"draft_stop": "entropy", "draft_stop_threshold": "2"}, r"threshold must be a number"),
    ],
)
def test_spec_config_rejects_bad_policies_naming_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        SpecConfig(**kw)


def test_spec_config_and_device_map_accept_policies():
    assert SpecConfig().draft_stop == "none"
    assert SpecConfig(draft_stop="none", draft_stop_threshold=0.7).draft_stop_threshold == 0.7
    dm = {"version": 1, "devices": {"x": {"backend": "onnxruntime"}}, "placement": {"draft": "x"}}
    m = load_device_map({**dm, "speculation": {"draft_stop": "entropy", "draft_stop_threshold": 2}})
    assert m.speculation == SpecConfig(draft_stop="entropy", draft_stop_threshold=2.0)
    with pytest.raises(DeviceMapError, match="speculation.draft_stop_threshold: must be in"):
        load_device_map({**dm, "speculation": {"draft_stop": "confidence"}})
