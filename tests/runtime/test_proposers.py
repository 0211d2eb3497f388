"""The model draft behind the `DraftSource` protocol (runtime.model_draft): it proposes what
the draft engine drafts, fails into an empty proposal, and `Combined` chooses between it and
a retrieval source by match length (SAM-Decoding's rule, which the scheduler no longer has)."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.devices.base import DeviceError
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.runtime.acceptance import Sampling
from mirror_sd.runtime.draft_engine import DraftEngine
from mirror_sd.runtime.drafters import Combined, DraftSource, Proposal
from mirror_sd.runtime.model_draft import ModelDraft
from mirror_sd.runtime.pipelines import Pipeline
from mirror_sd.runtime.scheduler import RunState
from mirror_sd.runtime.tracing import Tracer
from tests.runtime.conftest import tiny_model

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


class Fixed:
    """A retrieval stand-in: always proposes `tokens` with match length `match_len`."""

    name = "fixed"

    def __init__(self, tokens, match_len):
        self.tokens, self.match_len, self.seen = tuple(tokens), match_len, []

    def reset(self, context):
        self.seen = list(context)

    def extend(self, tokens):
        self.seen += tokens

    def propose(self, max_tokens):
        return Proposal(self.tokens[:max_tokens], self.match_len, self.name)


def _source(tmp_path, greedy=True):
    model = tiny_model(tmp_path, "llama", seed=3, num_hidden_layers=1)
    runner = TorchRunner(model, TorchDevice(), 128, name="draft")
    sampling = Sampling(0.0 if greedy else 1.0, 0, 1.0)
    engine = DraftEngine(runner, sampling, torch.Generator().manual_seed(0))
    pipe = Pipeline("npu", "draft")
    src = ModelDraft(engine, pipe, Tracer(), 5.0, RunState())
    return src, engine, runner, pipe, model


def test_it_proposes_what_the_engine_drafts(tmp_path):
    src, _, _, pipe, model = _source(tmp_path)
    try:
        assert isinstance(src, DraftSource)
        src.reset(PROMPT[:5])
        src.extend(PROMPT[5:])
        p = src.propose(4)
        ref = DraftEngine(TorchRunner(model, TorchDevice(), 128), Sampling(0.0, 0, 1.0),
                          torch.Generator()).draft_chain(PROMPT, 4)  # fmt: skip
        assert p.tokens == tuple(ref.tokens) and len(p.tokens) == 4
        assert p.source == "draft" and p.match_len == 0 and p.q is None
    finally:
        pipe.close()


def test_a_sampling_draft_hands_over_its_distributions(tmp_path):
    src, _, runner, pipe, _ = _source(tmp_path, greedy=False)
    try:
        src.reset(PROMPT)
        p = src.propose(3)
        assert p.q is not None and tuple(p.q.shape) == (3, runner.vocab_size)
        assert all(p.q[i, t] > 0 for i, t in enumerate(p.tokens))
    finally:
        pipe.close()


def test_a_failing_or_dropped_draft_proposes_nothing(tmp_path):
    src, _, runner, pipe, _ = _source(tmp_path)

    def broken(*a, **kw):
        raise DeviceError("npu lost")

    try:
        runner.forward = broken
        src.reset(PROMPT)
        with pytest.warns(UserWarning, match="draft device failed"):
            assert src.propose(4) == Proposal.empty("draft")
        assert src.state.fallback == "DeviceError: npu lost" and not src.state.draft_hung
        runner.forward = lambda *a, **kw: pytest.fail("a dropped draft is not submitted")
        assert src.propose(4) == Proposal.empty("draft")
    finally:
        pipe.close()


def test_combined_takes_retrieval_only_when_its_match_is_long_enough(tmp_path):
    src, _, _, pipe, _ = _source(tmp_path)
    try:
        for match, expected in ((3, "fixed"), (2, "draft")):
            retrieval = Fixed([7, 7, 7], match)
            both = Combined(retrieval, src, threshold=3)
            both.reset(PROMPT[:4])
            both.extend(PROMPT[4:])
            assert retrieval.seen == src.committed == PROMPT  # both follow the sequence
            assert both.propose(4).source == expected
        alone = Combined(Fixed([7], 1), None, threshold=3)  # retrieval alone, gated
        assert alone.propose(4) == Proposal.empty("combined")
    finally:
        pipe.close()


def test_a_generation_leaves_no_scheduler_in_a_reference_cycle(tmp_path, plan_factory):
    """The scheduler is freed when a generation ends, not whenever the cyclic collector runs
    (a scheduler <-> ModelDraft cycle kept a generation's runners, pipelines and tracer alive
    until then; a tensor-parallel target's process group must not outlive Plan.close())."""
    import gc

    from mirror_sd.runtime.scheduler import VerificationScheduler

    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3)
    draft = tiny_model(tmp_path, "llama", seed=3, num_hidden_layers=1)
    plan = plan_factory(target, draft, mode="mirror", retrieval="sam")
    gc.collect()
    gc.disable()
    try:
        plan.generate(PROMPT, 12)
        alive = [o for o in gc.get_objects() if type(o) is VerificationScheduler]
    finally:
        gc.enable()
    assert alive == []
