"""A failing draft device never changes or loses output; threads never leak."""

import threading
import time

import pytest
import torch

from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.runtime.autoregressive import greedy_decode
from mirror_sd.runtime.plan import PlanBusyError
from tests.runtime.conftest import tiny_model


class FaultyRunner(TorchRunner):
    """A real draft runner that misbehaves from its `after`-th forward on."""

    def __init__(self, model, fault, after=3, hang_s=30.0, times=None):
        super().__init__(model, TorchDevice(), 512, name="draft")
        self.fault, self.after, self.calls, self.hang_s = fault, after, 0, hang_s
        self.times = times  # None: every call from `after` on misbehaves; else this many
        self.release = threading.Event()  # set: a "hung" call returns at once

    def forward(self, ids, position_ids, mask):
        self.calls += 1
        if self.calls >= self.after and (
            self.times is None or self.calls < self.after + self.times
        ):
            if self.fault == "raise":
                raise RuntimeError("NPU driver lost the device")
            if self.fault == "hang":  # hangs until the test releases it (at most hang_s)
                self.release.wait(self.hang_s)
            if self.fault == "malformed":
                return torch.full((ids.shape[1], self.vocab_size), float("nan"))
        return super().forward(ids, position_ids, mask)


@pytest.fixture
def models(tmp_path):
    return tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4), tiny_model(
        tmp_path, "qwen2", seed=1, num_hidden_layers=2
    )


# Only the hang case waits for the timeout; the others get a long one, so that a busy machine
# (a slow but healthy draft step) cannot turn a raised error into a "hang".
HANG_TIMEOUT_S = 0.3


def faulty_plan(plan_factory, target, draft, fault: str, mode: str):
    """(the FaultyRunner, a plan drafting with it) for one fault kind."""
    runner = FaultyRunner(draft, fault, after=4)
    timeout = HANG_TIMEOUT_S if fault == "hang" else 60.0
    return runner, plan_factory(target, None, draft_runner=runner, mode=mode,
                                draft_timeout_s=timeout)  # fmt: skip


@pytest.mark.parametrize("fault", ["raise", "hang", "malformed"])
@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_draft_failure_falls_back_to_target_only(models, plan_factory, tmp_path, fault, mode):
    target, draft = models
    runner, plan = faulty_plan(plan_factory, target, draft, fault, mode)
    prompt = [5, 6, 7, 8]
    trace = tmp_path / "trace.json"
    with pytest.warns(UserWarning, match="target-only"):
        res = plan.generate(prompt, 24, trace=str(trace))
    assert res.tokens == greedy_decode(target, prompt, 24)
    assert res.stats.fallback and (fault != "hang" or "draft_timeout_s" in res.stats.fallback)
    assert "draft failed" in trace.read_text()
    if fault == "hang":  # a hung device is never used again by this plan
        assert plan.draft_disabled
        again = plan.generate(prompt, 8)
        assert again.tokens == greedy_decode(target, prompt, 8) and again.stats.draft_device is None
    runner.release.set()  # let an abandoned worker finish


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_draft_error_is_retried_after_some_rounds(models, plan_factory, tmp_path, mode):
    """One draft error: target-only rounds, then the draft again (from an empty cache, fed the
    committed tokens); the output is still the target's, the fault is reported."""
    target, draft = models
    runner = FaultyRunner(draft, "raise", after=4, times=1)
    plan = plan_factory(target, None, draft_runner=runner, mode=mode, draft_timeout_s=60.0,
                        draft_retry_rounds=2)  # fmt: skip
    prompt, trace = [5, 6, 7, 8], tmp_path / "trace.json"
    with pytest.warns(UserWarning, match="target-only"):
        res = plan.generate(prompt, 40, trace=str(trace))
    assert res.tokens == greedy_decode(target, prompt, 40)
    assert "NPU driver lost the device" in res.stats.fallback
    sources = [r.source for r in res.rounds]
    down = sources.index("target")  # the rounds after the error
    assert sources[down : down + 3] == ["target"] * 3  # draft_retry_rounds = 2 sat out, +1
    assert {"draft", "branch"} & set(sources[down + 3 :]), sources  # drafting again
    assert "draft retried" in trace.read_text()
    assert not plan.draft_disabled


def test_no_retry_when_rounds_is_0_and_backoff_when_it_keeps_failing(models, plan_factory):
    target, draft = models
    prompt = [5, 6, 7, 8]
    runner = FaultyRunner(draft, "raise", after=4, times=1)
    plan = plan_factory(target, None, draft_runner=runner, mode="speculative",
                        draft_timeout_s=60.0, draft_retry_rounds=0)  # fmt: skip
    with pytest.warns(UserWarning, match="target-only"):
        res = plan.generate(prompt, 30)
    sources = [r.source for r in res.rounds]
    assert set(sources[sources.index("target") :]) == {"target"}  # the rest target-only
    assert res.tokens == greedy_decode(target, prompt, 30)

    runner = FaultyRunner(draft, "raise", after=4)  # fails on every call from the 4th on
    plan = plan_factory(target, None, draft_runner=runner, mode="speculative",
                        draft_timeout_s=60.0, draft_retry_rounds=1)  # fmt: skip
    with pytest.warns(UserWarning, match="target-only") as caught:
        res = plan.generate(prompt, 60)
    assert res.tokens == greedy_decode(target, prompt, 60)
    # retried after 1, 2, 4, 8, 16 target-only rounds: the rounds between failures double
    failures = sum("target-only" in str(w.message) for w in caught)
    assert 4 <= failures <= 6, failures


def test_a_hung_draft_is_used_again_once_its_call_returns(models, plan_factory):
    target, draft = models
    runner = FaultyRunner(draft, "hang", after=4, times=1)
    plan = plan_factory(target, None, draft_runner=runner, mode="speculative",
                        draft_timeout_s=HANG_TIMEOUT_S)  # fmt: skip
    prompt = [5, 6, 7, 8]
    with pytest.warns(UserWarning, match="target-only"):
        res = plan.generate(prompt, 24)
    assert (
        res.tokens == greedy_decode(target, prompt, 24) and "draft_timeout_s" in res.stats.fallback
    )
    assert plan.draft_disabled  # the call still hangs: the draft is not used
    assert plan.generate(prompt, 8).stats.draft_device is None
    runner.release.set()  # the device answers again
    deadline = time.monotonic() + 10
    while plan.draft_disabled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert plan.draft_disabled is None
    again = plan.generate(prompt, 24)
    assert again.tokens == res.tokens and again.stats.fallback is None
    assert again.stats.draft_device is not None and "draft" in {r.source for r in again.rounds}


def test_no_thread_leak_over_100_generations(models, plan_factory):
    target, draft = models
    plan = plan_factory(target, draft, mode="mirror")
    plan.generate([1, 2, 3], 4)
    before = threading.active_count()
    for i in range(100):
        plan.generate([1, 2, 3, i % 90], 4)
    assert threading.active_count() == before
    plan.close()
    assert not any(t.name.startswith("mirror-sd-") for t in threading.enumerate())


def test_cancelled_stream_stops_both_pipelines(models, plan_factory):
    target, draft = models
    plan = plan_factory(target, draft, mode="mirror")
    stream = plan.stream([1, 2, 3], 200)
    first = next(stream)
    assert first
    stream.close()  # the round in flight completes; no further work is queued
    busy = plan.target_pipe.busy_s, plan.draft_pipe.busy_s
    for pipe in (plan.target_pipe, plan.draft_pipe):  # FIFO workers: once a no-op queued now
        pipe.pool.submit(lambda: None).result(timeout=30)  # has run, nothing else is pending
    assert (plan.target_pipe.busy_s, plan.draft_pipe.busy_s) == busy
    assert plan.last_result.tokens and len(plan.last_result.tokens) < 200
    # the plan is free again and produces the same tokens as before
    assert plan.generate([1, 2, 3], 8).tokens == greedy_decode(target, [1, 2, 3], 8)


def test_concurrent_generate_is_rejected(models, plan_factory):
    target, draft = models
    plan = plan_factory(target, draft, mode="mirror")
    stream = plan.stream([1, 2, 3], 50)
    next(stream)
    with pytest.raises(PlanBusyError, match="one generation at a time"):
        plan.generate([4, 5, 6], 4)
    stream.close()
    assert plan.generate([4, 5, 6], 4).tokens == greedy_decode(target, [4, 5, 6], 4)
