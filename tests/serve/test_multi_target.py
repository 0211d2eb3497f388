"""One server, several targets, one draft (#25): the two tiny targets share the ONNX Runtime
session of their common draft, and every answer is token for token what its plan gives alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import mirror_sd.api as api
from mirror_sd.serve.config import ServeConfig
from mirror_sd.serve.server import ServerThread
from tests.conftest import make_tiny, save_tiny_with_tokenizer, tiny_pair
from tests.serve.conftest import client, loaded, metrics, served_cli
from tests.serve.test_cli_serve import _user_error

ORT_DRAFT_MAP = """
version: 1
devices:
  a: {backend: torch, device: cpu, threads: 1}
  b: {backend: onnxruntime, providers: [CPUExecutionProvider: {}], intra_op_threads: 1}
placement: {target: a, draft: b}
"""
NAMES = ("alpha", "beta")
CHAT = [{"role": "user", "content": "w1 w2 w3"}]
PROMPTS = ["w5 w6 w7", "w9 w3 w3 w1", "w2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two saved plans, {id: folder}: a 6-layer and a 4-layer tiny target (speculative and
    mirror), each with the same 2-layer draft in ONNX Runtime (each folder its own copy)."""
    root = tmp_path_factory.mktemp("multi")
    t1, draft, _ = tiny_pair(root)
    t2 = save_tiny_with_tokenizer(make_tiny("qwen2", seed=2, num_hidden_layers=4), root / "t2")
    settings = {"alpha": (t1, dict(mode="speculative")),
                "beta": (t2, dict(mode="mirror", exit_layer=2, branch_budget=4))}  # fmt: skip
    out = {}
    for name, (target, spec) in settings.items():
        with api.compile(target, draft, ORT_DRAFT_MAP, onnx_dir=root / "onnx", max_len=256,
                         **spec) as plan:  # fmt: skip
            api.save(plan, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def alone(folders):
    """Each plan loaded on its own (a draft session of its own)."""
    with loaded(folders) as (plans, _):
        yield plans


@pytest.fixture(scope="module")
def shared(folders):
    """(plans, share): both plans loaded inside `shared_sessions()`, as `mirror-sd serve`."""
    with loaded(folders, share=True) as both:
        yield both


@pytest.fixture(scope="module")
def server(shared):
    with ServerThread(shared[0], ServeConfig("alpha", port=0)) as s:
        yield s


def _reference(alone, name: str, prompt, n: int = 16, chat: bool = False):
    return alone[name].generate(prompt, n, chat=chat)


def test_the_targets_differ_so_a_mixup_would_show(alone):
    a, b = (_reference(alone, name, PROMPTS[0]).tokens for name in NAMES)
    assert a != b


def test_two_plans_share_one_draft_session_and_keep_their_own_caches(shared, alone, folders):
    plans, share = shared
    a, b = plans["alpha"].draft, plans["beta"].draft
    assert a.session is b.session  # one InferenceSession: one copy of the draft's weights
    assert a.kv is not b.kv and a.kv.k is not b.kv.k  # each plan's own KV buffers
    assert alone["alpha"].draft.session is not a.session  # outside the block: a session each
    (what, graph, users), *rest = share.shared()
    assert what == "ONNX Runtime session" and users == 2 and not rest
    assert graph.is_relative_to(folders["alpha"])  # two folders' copies matched by content
    before = b.threads
    a.set_threads((before or 1) + 1)  # one plan's thread budget does not switch the other's
    assert b.threads == before and b.session is not a.session
    a.set_threads(before)
    assert a.session is b.session


@pytest.mark.parametrize("name", NAMES)
def test_shared_session_gives_each_plan_its_tokens(shared, alone, name):
    for prompt in PROMPTS:
        assert shared[0][name].generate(prompt, 16, chat=False).tokens == (
            _reference(alone, name, prompt).tokens
        )


def test_both_plans_at_once_on_the_shared_session(shared, alone):
    """The two plans' draft workers run the one session concurrently."""
    jobs = [(name, p) for p in PROMPTS for name in NAMES] * 2

    def run(job):
        name, prompt = job
        return shared[0][name].generate(prompt, 16, chat=False).tokens

    with ThreadPoolExecutor(2) as pool:  # a plan runs one generation at a time: one per plan
        by_plan = {n: pool.submit(lambda n=n: [run(j) for j in jobs if j[0] == n]) for n in NAMES}
        got = {n: f.result() for n, f in by_plan.items()}
    for name in NAMES:
        want = [_reference(alone, name, p).tokens for n, p in jobs if n == name]
        assert got[name] == want


def test_models_lists_every_target_and_unknown_is_404(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == list(NAMES)
    assert c.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="gamma", prompt="w1", max_tokens=2)
    body = err.value.response.json()["error"]
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "'alpha'" in body["message"] and "'beta'" in body["message"]
    assert httpx.get(server.url + "/models/gamma").status_code == 404


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_each_target_answers_as_its_plan_alone(server, alone, name, stream):
    c = client(server)
    ref = _reference(alone, name, CHAT, 20, chat=True)
    kwargs = dict(model=name, messages=CHAT, max_tokens=20, temperature=0)
    if stream:
        chunks = list(c.chat.completions.create(**kwargs, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert {ch.model for ch in chunks} == {name}
    else:
        r = c.chat.completions.create(**kwargs)
        text = r.choices[0].message.content
        assert r.model == name and r.usage.completion_tokens == len(ref.tokens)
    assert text == ref.text
    ref = _reference(alone, name, PROMPTS[1])
    r = c.completions.create(model=name, prompt=PROMPTS[1], max_tokens=16)
    assert r.choices[0].text == ref.text


def test_concurrent_requests_to_both_targets_stay_exact(server, alone):
    jobs = [(name, p) for p in PROMPTS for name in NAMES] * 2

    def ask(job):
        name, prompt = job
        r = client(server).completions.create(model=name, prompt=prompt, max_tokens=16)
        return r.choices[0].text

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [_reference(alone, n, p).text for n, p in jobs]


def test_health_and_metrics_per_target(server):
    for name in NAMES:
        client(server).completions.create(model=name, prompt="w1 w2", max_tokens=3)
    health = httpx.get(server.url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and set(health["models"]) == set(NAMES)
    m = metrics(server)
    done = {n: m.get(("mirror_sd_generations_total", (("model", n), ("outcome", "completed"))))
            for n in NAMES}  # fmt: skip
    assert all(done[n] is not None and done[n] >= 1 for n in NAMES), done
    assert m[("mirror_sd_requests_total", (("endpoint", "/health"), ("status", "200")))] >= 1
    capacity = (("model", "alpha"),)
    assert m[("mirror_sd_kv_rows_capacity", capacity)] == 256


def test_served_names_are_checked_before_compiling(capsys, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")  # missing: the name checks come first
    name = ["--served-model-name"]
    assert "'x' is served twice" in _user_error(capsys, ["serve", a, b, *name, "x", *name, "x"])
    assert "given 1 time(s) for 2 plan(s)" in _user_error(capsys, ["serve", a, b, *name, "x"])
    three = ["serve", a, *name, "x", *name, "y", *name, "z"]
    assert "given 3 time(s) for 1 plan(s)" in _user_error(capsys, three)
    same = str(tmp_path / "other" / "a")  # two folders both called 'a'
    assert "'a' is served twice" in _user_error(capsys, ["serve", a, same, "--port", "0"])
    assert "a" in _user_error(capsys, ["serve", a, str(tmp_path / "no-such"), "--port", "0"])


@pytest.mark.parametrize("flags", [(), ("--no-shared-draft",)])
def test_one_command_serves_two_saved_plans(folders, alone, tmp_path, flags):
    with served_cli(folders, tmp_path / "cache", *flags) as (c, lines):
        assert any("serving 'alpha', 'beta' at" in x for x in lines)
        shared = any("2 plans share one ONNX Runtime session" in x for x in lines)
        assert shared == (not flags), lines
        for name in NAMES:
            r = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=16)
            assert r.choices[0].text == _reference(alone, name, PROMPTS[0]).text
