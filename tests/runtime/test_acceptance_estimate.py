"""α for the cost model: measured on the target's own greedy answer (runtime/profiling.py),
position by position the agreement a greedy speculative round checks."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.runtime.autoregressive import extend, greedy_decode
from mirror_sd.runtime.profiling import answer_agreement, greedy_answer, teacher_forced
from tests.runtime.conftest import tiny_model

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def _runner(model, name: str, max_len: int = 64) -> TorchRunner:
    return TorchRunner(model, TorchDevice(), max_len, name=name)


def test_greedy_answer_is_the_target_s_own_greedy_decoding(tmp_path):
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=2)
    runner = _runner(target, "t")
    assert greedy_answer(runner, PROMPT, 20) == greedy_decode(target, PROMPT, 20)
    assert len(greedy_answer(runner, PROMPT, 500)) == 64 - len(PROMPT)  # the context ends first
    with pytest.raises(ValueError, match="leaves no room"):
        greedy_answer(runner, list(range(64)), 4)


def test_answer_agreement_counts_the_draft_s_argmax_on_the_answer_only(tmp_path):
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=2)
    other = tiny_model(tmp_path, seed=5, num_hidden_layers=1)
    t = _runner(target, "t")
    alpha, cov = answer_agreement(t, _runner(target, "d"), PROMPT, siblings=2, n=24)
    assert alpha == 1.0 and cov == (0.0, 0.0)  # the target as its own draft never misses

    answer = greedy_decode(target, PROMPT, 24)
    with torch.inference_mode():
        d = extend(other, other.new_cache(64), PROMPT + answer[:-1])  # (T, V)
    guess = d.argmax(-1)[len(PROMPT) - 1 :].tolist()  # the draft's guess of each answer token
    want = sum(g == a for g, a in zip(guess, answer, strict=True)) / len(answer)
    alpha, _ = answer_agreement(t, _runner(other, "d"), PROMPT, n=24)
    assert alpha == pytest.approx(want)
    assert 0 < want < 1  # the check can tell counted positions from skipped ones


class _Missing:
    """The target as a draft, except that at positions `miss` its top token is ruled out."""

    def __init__(self, runner, miss):
        self.runner, self.miss, self.max_len = runner, miss, runner.max_len

    def rollback(self, n):
        self.runner.rollback(n)

    def forward(self, ids, pos, mask):
        out = self.runner.forward(ids, pos, mask).clone()
        rows = out.reshape(-1, out.shape[-1])
        for p in self.miss:
            rows[p, rows[p].argmax()] = float("-inf")
        return out


def test_teacher_forced_skips_the_positions_before_first(tmp_path):
    target = tiny_model(tmp_path, seed=0, num_hidden_layers=2)
    ids, miss = PROMPT * 3, (1, 2, 9, 20)
    hits = torch.ones(len(ids), dtype=torch.double)
    hits[list(miss)] = 0
    t, d = _runner(target, "t"), _Missing(_runner(target, "d"), miss)
    for first in (0, 2, 3, 10, len(ids) - 1):
        got, _ = teacher_forced(t, d, ids, first=first)
        assert got == pytest.approx(float(hits[first:].mean())), first
    with pytest.raises(ValueError, match="first=24"):
        teacher_forced(t, d, ids, first=len(ids))


def test_retrieval_rounds_replay_the_runtime_s_rounds_exactly(tmp_path):
    """The profile's replay of a draft-free source over the target's answer makes the very
    rounds (rows verified, tokens committed) that generating the answer runs."""
    from mirror_sd.runtime.drafters.sources import make_source
    from mirror_sd.runtime.profiling import retrieval_rounds
    from tests.runtime.conftest import make_plan

    target = tiny_model(tmp_path, seed=0, num_hidden_layers=2)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]
    plan = make_plan(target, None, mode="speculative", retrieval="sam", model_draft=False,
                     num_draft_tokens=4)  # fmt: skip
    try:
        res = plan.generate(prompt, 40)
    finally:
        plan.close()
    answer = greedy_decode(target, prompt, 40)
    assert res.tokens == answer
    ran = [(r.drafted + 1, r.committed) for r in res.rounds]
    replayed = retrieval_rounds(make_source("sam", 4), prompt, answer, 4, 3)
    assert list(replayed) == ran
    assert any(rows > 1 for rows, _ in replayed)  # the source proposed something
    assert sum(n for _, n in replayed) == len(answer)


def test_profile_reads_alpha_off_the_answer_or_the_calibration_text_when_none_fits(tmp_path):
    from mirror_sd.runtime.drafters.sources import make_source
    from mirror_sd.runtime.profiling import MIN_ANSWER_TOKENS, profile

    target = tiny_model(tmp_path, seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, seed=5, num_hidden_layers=1)
    t = TorchRunner(target, TorchDevice(), 64, exit_layer=2)
    d = _runner(draft, "d")
    calib = PROMPT * 2

    def run(prompt):
        return profile(t, d, target, calib, max_block=5, draft_rows=(1, 2), context=8, reps=1,
                       acceptance_ids=prompt, retrieval=("sam", make_source("sam", 4), 3))  # fmt: skip

    on_answer = run(PROMPT)
    assert on_answer.accept_rate == answer_agreement(t, d, PROMPT, n=64 - len(PROMPT))[0]
    assert on_answer.retrieval_source == "sam"
    assert sum(n for _, n in on_answer.retrieval_rounds) == 64 - len(PROMPT)
    assert all(rows <= 5 for rows, _ in on_answer.retrieval_rounds)  # γ = max_block - 1
    too_long = run([1] * (64 - MIN_ANSWER_TOKENS + 1))
    assert too_long.accept_rate == teacher_forced(t, d, calib)[0]
    assert too_long.retrieval_rounds == () and too_long.retrieval_source == ""
