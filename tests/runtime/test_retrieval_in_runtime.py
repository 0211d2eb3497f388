"""Model-free draft sources inside the round loop: lossless alone and combined with the draft."""

import pytest

from mirror_sd.runtime.autoregressive import greedy_decode
from tests.runtime.conftest import tiny_model

PROMPT = [5, 6, 7, 8, 9] * 4  # a repetitive prompt, so n-gram / suffix matches exist


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("m")
    return tiny_model(tmp, "llama", seed=0, num_hidden_layers=3), tiny_model(
        tmp, "llama", seed=3, num_hidden_layers=1
    )


@pytest.mark.parametrize("source", ["pld", "sam", "hd"])
def test_retrieval_alone_is_lossless_and_used(models, plan_factory, source):
    target, _ = models
    plan = plan_factory(target, None, mode="speculative", retrieval=source, retrieval_min_match=1)
    ref = greedy_decode(target, PROMPT, 40)
    res = plan.generate(PROMPT, 40)
    assert res.tokens == ref
    by_source = res.stats.tokens_by_source
    assert sum(n for k, n in by_source.items() if k.startswith(source)) > 0, by_source
    assert sum(by_source.values()) >= 40


@pytest.mark.parametrize("mode", ["speculative", "mirror"])
def test_retrieval_combined_with_model_draft(models, plan_factory, mode):
    target, draft = models
    plan = plan_factory(target, draft, mode=mode, retrieval="sam", retrieval_min_match=2)
    ref = greedy_decode(target, PROMPT, 40)
    res = plan.generate(PROMPT, 40)
    assert res.tokens == ref
    assert set(res.stats.tokens_by_source) <= {
        "draft",
        "branch",
        "sam:dynamic",
        "sam:static",
        "target",
    }


def test_hierarchy_drafting_remembers_previous_outputs(models, plan_factory):
    """The second identical request is drafted from the plan's recent outputs."""
    target, _ = models
    plan = plan_factory(target, None, mode="speculative", retrieval="hd", retrieval_min_match=2)
    prompt = [11, 12, 13, 14]
    first = plan.generate(prompt, 24)
    second = plan.generate(prompt, 24)
    assert first.tokens == second.tokens == greedy_decode(target, prompt, 24)
    assert second.stats.rounds < first.stats.rounds or second.stats.tokens_by_source.get(
        "hd:recent"
    )
