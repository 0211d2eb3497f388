"""S2D's one draft for several targets (#25) with the draft in torch: plans whose torch draft
is the same checkpoint get one `CausalLM` inside `shared_sessions()` (what `mirror-sd serve`
loads plans in), each plan keeps its own KV cache and exit heads, the logit-lens exits read
the model's own head rows instead of copies, and every answer is its plan's own."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import mirror_sd.api as api
from mirror_sd.devices.shared_sessions import TORCH_MODEL
from mirror_sd.devices.sorted_exits import SortedExitRunner
from mirror_sd.graphs.heads import dense_head
from mirror_sd.serve.config import ServeConfig
from mirror_sd.serve.server import ServerThread
from tests.conftest import TORCH_DRAFT_MAP, make_tiny, save_tiny_with_tokenizer, tiny_pair
from tests.serve.conftest import client, loaded, served_cli

NAMES = ("alpha", "beta")
PROMPTS = ["w5 w6 w7", "w9 w3 w3 w1", "w2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two saved plans, {id: folder}: a 6-layer and a 4-layer tiny target, each with the same
    8-layer torch draft running S2D's logit-lens exits (layers 2 and 4) at thresholds of its
    own, as compile picks one per target."""
    root = tmp_path_factory.mktemp("s2d-multi")
    t1, _, _ = tiny_pair(root)
    t2 = save_tiny_with_tokenizer(make_tiny("qwen2", seed=2, num_hidden_layers=4), root / "t2")
    draft = save_tiny_with_tokenizer(make_tiny("qwen2", seed=1, num_hidden_layers=8), root / "d")
    out = {}
    for name, target, threshold in (("alpha", t1, 0.0), ("beta", t2, 0.5)):
        with api.compile(target, draft, TORCH_DRAFT_MAP, max_len=256, mode="speculative",
                         draft_exits="lens", draft_exit_threshold=threshold) as plan:  # fmt: skip
            api.save(plan, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def alone(folders):
    with loaded(folders) as (plans, _):
        yield plans


@pytest.fixture(scope="module")
def shared(folders):
    with loaded(folders, share=True) as both:
        yield both


def _tokens(plans, name, prompt):
    return plans[name].generate(prompt, 16, chat=False).tokens


def test_one_torch_model_serves_both_plans_with_their_own_caches(shared, alone):
    plans, share = shared
    a, b = plans["alpha"].draft, plans["beta"].draft
    assert isinstance(a, SortedExitRunner) and isinstance(b, SortedExitRunner)
    assert a.runner.model is b.runner.model  # one copy of the draft's weights
    assert a.runner.cache is not b.runner.cache  # each plan's own K/V
    assert (a.threshold, b.threshold) == (0.0, 0.5)  # each plan's own exit rule
    assert alone["alpha"].draft.runner.model is not a.runner.model  # outside the block
    assert [(what, users) for what, _, users in share.shared()] == [(TORCH_MODEL, 2)]
    rows = dense_head(a.runner.model).data_ptr()  # the lens exits read one set of head rows
    assert {h.rows.data_ptr() for h in (*a.heads, *b.heads)} == {rows}


@pytest.mark.parametrize("name", NAMES)
def test_the_shared_draft_gives_each_plan_its_tokens(shared, alone, name):
    for prompt in PROMPTS:
        assert _tokens(shared[0], name, prompt) == _tokens(alone, name, prompt)
        ref = alone[name].generate(prompt, 16, chat=False, mode="autoregressive").tokens
        assert _tokens(alone, name, prompt) == ref  # and both are the target's own
    if name == "alpha":  # threshold 0: every short draft step stops at the first exit
        assert shared[0][name].draft.exits[2] > 0


def test_both_plans_at_once_through_the_openai_client(shared, alone):
    jobs = [(name, p) for p in PROMPTS for name in NAMES] * 2
    with ServerThread(shared[0], ServeConfig("alpha", port=0)) as server:

        def ask(job):
            name, prompt = job
            r = client(server).completions.create(model=name, prompt=prompt, max_tokens=16)
            return r.choices[0].text

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, jobs))
    assert got == [alone[n].generate(p, 16, chat=False).text for n, p in jobs]


def test_the_server_log_names_the_shared_model(folders, alone, tmp_path):
    with served_cli(folders, tmp_path / "cache") as (c, lines):
        assert any("2 plans share one torch model of " in x for x in lines), lines
        r = c.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=16)
        assert r.choices[0].text == alone["beta"].generate(PROMPTS[0], 16, chat=False).text
