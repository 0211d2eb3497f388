"""How a round gets its block: `Combined` gates a sequence's retrieval source by match length
(SAM-Decoding's rule) and the model draft drafts the rest; each sequence of a batch runs its
own fork of the plan's source, sharing plan-level memory only."""

from __future__ import annotations

from mirror_sd.runtime.drafters import Combined, HierarchyDrafter, Proposal, SamDrafter
from mirror_sd.runtime.drafters.sources import fork
from tests.runtime.conftest import tiny_model

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


class Fixed:
    """A retrieval stand-in: always proposes `tokens` with match length `match_len`."""

    def __init__(self, tokens, match_len, name="fixed"):
        self.tokens, self.match_len, self.seen, self.name = tuple(tokens), match_len, [], name

    def reset(self, context):
        self.seen = list(context)

    def extend(self, tokens):
        self.seen += tokens

    def propose(self, max_tokens):
        return Proposal(self.tokens[:max_tokens], self.match_len, self.name)


def test_combined_takes_retrieval_only_when_its_match_is_long_enough():
    for match, expected in ((3, "fixed"), (2, "model")):
        retrieval, model = Fixed([7, 7, 7], match), Fixed([1], 0, name="model")
        both = Combined(retrieval, model, threshold=3)
        both.reset(PROMPT[:4])
        both.extend(PROMPT[4:])
        assert retrieval.seen == model.seen == PROMPT  # both follow the sequence
        assert both.propose(4).source == expected
    alone = Combined(Fixed([7], 1), None, threshold=3)  # retrieval alone, gated
    assert alone.propose(4) == Proposal.empty("combined")


def test_forks_follow_their_own_sequences_and_share_plan_memory():
    sam = SamDrafter(corpus=[[40, 41, 42, 43]])
    a, b = fork(sam), fork(sam)
    a.reset([1, 2, 3, 1, 2])
    b.reset([9, 40, 41])
    assert a.propose(2).tokens == (3, 1) and a.propose(2).source == "sam:dynamic"
    assert b.propose(2).tokens == (42, 43) and b.propose(2).source == "sam:static"
    a.extend([3])  # a's sequence moves on; b's match is untouched
    assert b.propose(2).tokens == (42, 43) and a.corpus is b.corpus is sam.corpus
    hd = HierarchyDrafter(max_ngram=2, capacity=4)
    first = fork(hd)
    first.reset([5, 6])
    hd.finish([5, 6], [70, 71, 72])  # the plan learns from a finished generation
    later = fork(hd)
    later.reset([8, 70, 71])
    assert later.propose(1).tokens == (72,) and later.propose(1).source == "hd:recent"
    assert first.recent == later.recent == [(70, 71, 72)]  # one memory


def test_a_generation_leaves_no_scheduler_in_a_reference_cycle(tmp_path, plan_factory):
    """The scheduler is freed when a generation ends, not whenever the cyclic collector runs
    (a cycle would keep a generation's runners, pipelines and tracer alive until then; a
    tensor-parallel target's process group must not outlive Plan.close())."""
    import gc

    from mirror_sd.runtime.scheduler import VerificationScheduler

    target = tiny_model(tmp_path, "llama", seed=0, num_hidden_layers=3)
    draft = tiny_model(tmp_path, "llama", seed=3, num_hidden_layers=1)
    plan = plan_factory(target, draft, mode="mirror", retrieval="sam")
    gc.collect()
    gc.disable()
    try:
        plan.generate(PROMPT, 12)
        plan.generate([PROMPT, PROMPT[:5]], 12)
        alive = [o for o in gc.get_objects() if type(o) is VerificationScheduler]
    finally:
        gc.enable()
    assert alive == []
