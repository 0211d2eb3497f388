"""HTTP fuzzing (#26): arbitrary JSON bodies and bytes against the OpenAI endpoints. Every
answer is a success or an OpenAI error body with a 4xx status; never a 5xx, never a
traceback, and the server keeps answering."""

from __future__ import annotations

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import MODEL

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
        "top_p", "top_k", "stop", "stream", "stream_options", "n", "seed", "logprobs", "user",
        "presence_penalty", "frequency_penalty", "response_format", "tools", "return_token_ids"]  # fmt: skip
VALID = {
    "/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "w1 w2"}],
                          "max_tokens": 3},
    "/completions": {"model": MODEL, "prompt": "w1 w2", "max_tokens": 3},
}  # fmt: skip
OK_STATUS = {200, 400, 404, 413, 422, 429}


def _check(response: httpx.Response) -> None:
    assert response.status_code in OK_STATUS, (response.status_code, response.text)
    assert "Traceback" not in response.text
    if response.status_code != 200:
        err = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(err) and err["message"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(sorted(VALID)),
    changes=st.dictionaries(st.sampled_from(KEYS), JSON, max_size=3),
    drop=st.lists(st.sampled_from(KEYS), max_size=2),
)
def test_mutated_bodies_get_a_result_or_a_4xx_error(server, path, changes, drop):
    body = {k: v for k, v in {**VALID[path], **changes}.items() if k not in drop}
    for key in ("max_tokens", "max_completion_tokens"):  # a valid long request only costs time
        if isinstance(body.get(key), int) and body[key] > 8:
            body[key] = 8
    with httpx.Client(timeout=60) as http:
        response = http.post(server.url + path, json=body)
        _check(response)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from([*VALID, "/models", "/nope"]), raw=st.binary(max_size=64))
def test_arbitrary_bytes_get_a_4xx_error(server, path, raw):
    with httpx.Client(timeout=60) as http:
        response = http.post(server.url + path, content=raw,
                             headers={"content-type": "application/json"})  # fmt: skip
        assert response.status_code < 500 and "Traceback" not in response.text
    again = httpx.post(server.url + "/chat/completions", json=VALID["/chat/completions"])
    assert again.status_code == 200  # still serving
