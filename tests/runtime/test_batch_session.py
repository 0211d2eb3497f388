"""`plan.batch_session()`: sequences admitted between rounds, cancelled, streamed per round; every
finished sequence equals its batch-1 output."""

from __future__ import annotations

import pytest

from mirror_sd.runtime.autoregressive import greedy_decode
from mirror_sd.runtime.batch_session import BatchFullError
from mirror_sd.runtime.plan import PlanBusyError
from tests.runtime.test_batch import PROMPTS


@pytest.fixture
def models(tmp_path):
    from tests.runtime.conftest import tiny_model

    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    return target, tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_admit_stream_cancel_and_results(models, plan_factory, mode):
    target, draft = models
    plan = plan_factory(target, draft, mode=mode, num_draft_tokens=3, max_len=1024)
    refs = {i: greedy_decode(target, PROMPTS[i], 14) for i in range(4)}
    streamed: dict[int, list[int]] = {}
    with plan.batch_session() as b:
        h0, h1 = b.admit(PROMPTS[0], 14), b.admit(PROMPTS[1], 14)
        late = {}
        for k, deltas in enumerate(b.rounds()):
            for h, toks in deltas.items():
                streamed.setdefault(h, []).extend(toks)
            if k == 1:  # two sequences join a running batch, one is cancelled at once
                late[2], late[3] = b.admit(PROMPTS[2], 14), b.admit(PROMPTS[3], 14)
                b.cancel(h1)
        with pytest.raises(PlanBusyError):
            plan.generate(PROMPTS[0], 4)
        for i, h in ((0, h0), *late.items()):
            assert b.result(h).tokens == streamed[h] == refs[i], f"prompts[{i}]"
        cut = b.result(h1).tokens
        assert cut == refs[1][: len(cut)] and len(cut) < 14  # cancelled: a prefix, then left
        assert b.live == 0
    assert plan.generate(PROMPTS[0], 4).tokens == refs[0][:4]  # the plan is free again


def test_admit_checks_input_and_room(models, plan_factory):
    target, draft = models
    plan = plan_factory(target, draft, mode="speculative", num_draft_tokens=3, max_len=64)
    with plan.batch_session() as b:
        with pytest.raises(ValueError, match="token id 500"):
            b.admit([1, 500], 4)
        with pytest.raises(ValueError, match="whole session"):
            b.admit([1], 4, mode="mirror")
        b.admit([1] * 20, 20)  # 20 + 20 + 4 rows of 64
        with pytest.raises(BatchFullError, match="after some sequences finish"):
            b.admit([2] * 10, 10)
        for _ in b.rounds():
            pass
        b.admit([2] * 10, 10)  # room again once the first finished
        assert [len(d[1]) for d in b.rounds() if 1 in d] and b.result(1).tokens


def test_cancelled_rows_are_free_for_the_next_admission(models, plan_factory):
    """A cancelled sequence leaves before the next round, so its reserved rows count as free at
    once: a sequence that did not fit beside it is admitted at the same boundary."""
    target, draft = models
    plan = plan_factory(target, draft, mode="speculative", num_draft_tokens=3, max_len=64)
    ref = greedy_decode(target, [2] * 10, 10)
    with plan.batch_session() as b:
        h0 = b.admit([1] * 20, 20)  # 20 + 20 + 4 rows of 64
        rounds = b.rounds()
        next(rounds)
        assert b.rows_in_use > 0
        with pytest.raises(BatchFullError):
            b.admit([2] * 10, 10)
        b.cancel(h0)
        h1 = b.admit([2] * 10, 10)  # no round in between
        for _ in rounds:
            pass
        assert b.result(h1).tokens == ref and len(b.result(h0).tokens) < 20
        assert b.rows_in_use == 0 and b.live == 0


def test_a_session_retries_its_draft_after_an_error(models, plan_factory):
    """A draft error in a running session: the live sequences go on target-only (same tokens,
    their fallback says why), the draft is retried after draft_retry_rounds, and a sequence
    that joins after that drafts again and reports no fault."""
    from tests.runtime.test_faults import FaultyRunner

    target, draft = models
    runner = FaultyRunner(draft, "raise", after=3, times=1)
    plan = plan_factory(target, None, draft_runner=runner, mode="speculative",
                        num_draft_tokens=3, max_len=1024, draft_retry_rounds=1)  # fmt: skip
    refs = {i: greedy_decode(target, PROMPTS[i], 24) for i in range(3)}
    with pytest.warns(UserWarning, match="target-only"), plan.batch_session() as b:
        h = {0: b.admit(PROMPTS[0], 24), 1: b.admit(PROMPTS[1], 24)}
        for k, _ in enumerate(b.rounds()):
            if k == 4:  # after the error (the draft's 3rd call) and the retry
                h[2] = b.admit(PROMPTS[2], 24)
        results = {i: b.result(x) for i, x in h.items()}
    assert all(results[i].tokens == refs[i] for i in range(3))
    assert results[0].stats.fallback and results[1].stats.fallback
    assert results[2].stats.fallback is None
    assert "draft" in {r.source for r in results[2].rounds}  # the late joiner drafted
    assert runner.calls > 3
