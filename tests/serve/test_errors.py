"""Bad requests get OpenAI error bodies with the right 4xx and the field named; a failing
plan or draft never leaks a traceback and never stops the server."""

import threading

import httpx
import openai
import pytest
import torch

from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.runtime.autoregressive import greedy_decode
from tests.runtime.conftest import make_plan, tiny_model
from tests.serve.conftest import MODEL, SessionProxy, client, metrics, running

OK = dict(model=MODEL, messages=[{"role": "user", "content": "w1"}], max_tokens=4)


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, **kwargs)


def _error(response: httpx.Response, status: int, param: str | None) -> str:
    """Check an OpenAI error body of `status` naming `param`; return its message."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    return err["message"]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({**OK, "max_tokens": -1}, "max_tokens", "positive integer"),
        ({**OK, "max_tokens": "12"}, "max_tokens", "integer"),
        ({**OK, "temperature": 3}, "temperature", "[0, 2]"),
        ({**OK, "top_p": 0}, "top_p", "(0, 1]"),
        ({**OK, "n": 2}, "n", "n=1"),
        ({**OK, "logprobs": True}, "logprobs", "not supported"),
        ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({**OK, "messages": []}, "messages", "non-empty"),
        ({**OK, "messages": [{"content": "hi"}]}, "messages[0]", "role"),
        ({**OK, "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
        ({**OK, "return_token_ids": "yes"}, "return_token_ids", "boolean"),
        ({k: v for k, v in OK.items() if k != "model"}, "model", "required"),
    ],
)
def test_invalid_chat_parameters_are_400_naming_the_field(server, body, param, says):
    assert says in _error(_post(server, "/chat/completions", json=body), 400, param)


def test_malformed_and_non_object_bodies_are_400(server):
    bad = _post(
        server,
        "/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert "not valid JSON" in _error(bad, 400, None)
    assert "JSON object" in _error(_post(server, "/completions", json=[1, 2]), 400, None)
    several = {"model": MODEL, "prompt": ["w1", "w2"], "max_tokens": 2}
    assert "one prompt per request" in _error(
        _post(server, "/completions", json=several), 400, "prompt"
    )


def test_negative_max_tokens_through_the_openai_client(server):
    with pytest.raises(openai.BadRequestError) as err:
        client(server).completions.create(model=MODEL, prompt="w1", max_tokens=-1)
    assert err.value.response.json()["error"]["param"] == "max_tokens"


def test_over_long_prompt_is_400_context_length_exceeded(server):
    long = " ".join(f"w{i % 90}" for i in range(300))  # the plan's context is 256 tokens
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client(server).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=8,
                stream=stream,
            )  # fmt: skip
        body = err.value.response.json()["error"]
        assert body["param"] == "messages" and body["code"] == "context_length_exceeded"
        assert "exceeds the context of 256 tokens" in body["message"]
        assert body["message"].startswith("prompt")  # no batch index in a client's message


def test_unknown_model_and_route_are_404(server):
    with pytest.raises(openai.NotFoundError) as err:
        client(server).chat.completions.create(**{**OK, "model": "gpt-5"})
    assert err.value.response.json()["error"]["code"] == "model_not_found"
    assert "'tiny'" in err.value.response.json()["error"]["message"]
    _error(httpx.get(server.url + "/models/gpt-5"), 404, "model")
    _error(httpx.get(server.url + "/nothing-here"), 404, None)
    _error(httpx.get(server.url + "/chat/completions"), 405, None)


def test_server_keeps_serving_after_bad_requests(plan, server):
    before = metrics(server)
    for _ in range(3):
        _post(server, "/chat/completions", content=b"]")
        _post(server, "/completions", json={"model": MODEL, "prompt": "w1", "max_tokens": 0})
    r = client(server).chat.completions.create(**OK)
    assert r.choices[0].message.content == plan.generate(OK["messages"], 4).text
    after = metrics(server)
    key = ("mirror_sd_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))
    assert after[key] - before.get(key, 0) == 3


class _BrokenPlan:
    """A plan whose generation hits a bug (an exception that is not the user's)."""

    def __init__(self, plan):
        self._plan, self.calls = plan, 0

    def __getattr__(self, name):
        return getattr(self._plan, name)

    def stream(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("secret internal detail")
        yield from self._plan.stream(*args, **kwargs)

    def batch_session(self, *args, **kwargs):
        return _BrokenSession(self, self._plan.batch_session(*args, **kwargs))


class _BrokenSession(SessionProxy):
    """The first batch session whose rounds run hits a bug after admitting its request."""

    @property
    def _plan(self) -> _BrokenPlan:
        return self._owner

    def rounds(self):
        self._plan.calls += 1
        if self._plan.calls == 1:
            raise RuntimeError("secret internal detail")
        yield from self._session.rounds()


@pytest.mark.parametrize("engine", ["batch", "serial"])
def test_a_bug_is_a_500_without_details_and_the_server_goes_on(plan, engine):
    with running(_BrokenPlan(plan), engine=engine) as server:
        r = _post(server, "/chat/completions", json=OK)
        assert "secret" not in _error(r, 500, None) and r.json()["error"]["type"] == "server_error"
        assert client(server).chat.completions.create(**OK).choices[0].message.content


class _FailingDraft(TorchRunner):
    """A draft runner whose device fails from its 4th forward on."""

    def __init__(self, model):
        super().__init__(model, TorchDevice(), 512, name="draft")
        self.calls, self.lock = 0, threading.Lock()

    def forward(self, ids, position_ids, mask):
        with self.lock:
            self.calls += 1
        if self.calls >= 4:
            raise RuntimeError("NPU driver lost the device")
        return super().forward(ids, position_ids, mask)


@pytest.mark.filterwarnings("ignore:.*target-only:UserWarning")
@pytest.mark.parametrize("engine", ["batch", "serial"])
def test_draft_fault_falls_back_is_counted_and_serving_goes_on(tmp_path, engine):
    target = tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4)
    draft = tiny_model(tmp_path, "qwen2", seed=1, num_hidden_layers=2)
    plan = make_plan(target, None, draft_runner=_FailingDraft(draft), mode="mirror")
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        ref = greedy_decode(target, prompt, 24)
    try:
        with running(plan, engine=engine) as server:
            for _ in range(2):  # the faulty draft fails every generation; each falls back
                r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=24)
                assert r.choices[0].text == "".join(f" {t}" for t in ref)  # lossless
            m = metrics(server)
        assert m[("mirror_sd_draft_fallbacks_total", ())] == 2
        assert m[("mirror_sd_generations_total", (("outcome", "completed"),))] == 2
    finally:
        plan.close()
