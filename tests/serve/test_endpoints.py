"""The OpenAI endpoints through the official client: every greedy answer equals the plan's
own batch-1 `generate`, whole or streamed, chat or completion."""

import json

import httpx
import pytest

from tests.serve.conftest import MODEL, client, running

CHAT = [{"role": "system", "content": "w9 w8"}, {"role": "user", "content": "w1 w2 w3"}]


def _streamed(chunks) -> tuple[str, list]:
    chunks = list(chunks)
    text = "".join(
        (c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
        for c in chunks
        if c.choices
    )
    return text, chunks


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_plan_generate(plan, server, stream):
    ref = plan.generate(CHAT, 24)
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    if stream:
        text, chunks = _streamed(
            client(server).chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == "length"
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    else:
        r = client(server).chat.completions.create(**kwargs)
        text, usage = r.choices[0].message.content, r.usage
        assert r.choices[0].finish_reason == "length" and r.model == MODEL
    assert text == ref.text
    assert (usage.prompt_tokens, usage.completion_tokens) == (ref.prompt_tokens, len(ref.tokens))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", ["w5 w6 w7", [5, 6, 7, 8]])
def test_completion_equals_plan_generate(plan, server, stream, prompt):
    ref = plan.generate(prompt, 16, chat=False)
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=16)
    if stream:
        text, chunks = _streamed(client(server).completions.create(**kwargs, stream=True))
        assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
    else:
        r = client(server).completions.create(**kwargs)
        text = r.choices[0].text
        assert r.usage.completion_tokens == len(ref.tokens)
        assert r.usage.prompt_tokens == ref.prompt_tokens
    assert text == ref.text


def test_sampling_parameters_reach_the_plan(plan, server):
    """temperature, top_p and seed map onto the plan's: the same seed gives the plan's sample."""
    ref = plan.generate("w3 w4", 16, chat=False, temperature=0.9, top_p=0.8, seed=7)
    r = client(server).completions.create(
        model=MODEL, prompt="w3 w4", max_tokens=16, temperature=0.9, top_p=0.8, seed=7
    )
    assert r.choices[0].text == ref.text
    greedy = plan.generate("w3 w4", 16, chat=False)
    assert ref.tokens != greedy.tokens  # the sample is not the greedy answer
    ref_k = plan.generate("w3 w4", 16, chat=False, temperature=1.0, top_k=3, seed=5)
    r = client(server).completions.create(
        model=MODEL, prompt="w3 w4", max_tokens=16, temperature=1.0, seed=5, extra_body={"top_k": 3}
    )
    assert r.choices[0].text == ref_k.text


def test_stop_string_ends_the_text_before_it(plan, server):
    prompt = "w10 w11 w12"
    ref = plan.generate(prompt, 16, chat=False)
    words = ref.text.split()
    # a word the greedy answer first says after a few others; the text ends before it
    stop = next(w for i, w in enumerate(words) if i >= 3 and w not in words[:i])
    expected = ref.text[: ref.text.index(" " + stop)]
    assert expected
    r = client(server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, stop=" " + stop
    )
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    text, chunks = _streamed(
        client(server).completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, stop=["w99x", " " + stop], stream=True
        )
    )
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(server).models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["running"] == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_return_token_ids_gives_the_plans_tokens(plan, server, stream, kind):
    """`return_token_ids` (vLLM's extension): the choice's `token_ids` are `generate`'s tokens,
    whole or on the closing chunk of a stream; without it no choice carries them."""
    chat = kind == "chat"
    ref = plan.generate(CHAT if chat else "w5 w6", 12, chat=chat)
    body = {"model": MODEL, "max_tokens": 12, "return_token_ids": True, "stream": stream}
    body.update({"messages": CHAT} if chat else {"prompt": "w5 w6"})
    path = f"{server.url}/{'chat/completions' if chat else 'completions'}"
    if stream:
        with httpx.stream("POST", path, json=body, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]  # fmt: skip
        closing = [e["choices"][0] for e in events if e["choices"][0]["finish_reason"]]
        assert len(closing) == 1 and closing[0]["token_ids"] == list(ref.tokens)
        assert all("token_ids" not in e["choices"][0] for e in events[:-1])
    else:
        choice = httpx.post(path, json=body, timeout=60).json()["choices"][0]
        assert choice["token_ids"] == list(ref.tokens)
        body["return_token_ids"] = False
        assert "token_ids" not in httpx.post(path, json=body, timeout=60).json()["choices"][0]


def test_the_serial_engine_returns_token_ids_too(plan):
    ref = plan.generate("w5 w6", 12, chat=False)
    body = {"model": MODEL, "prompt": "w5 w6", "max_tokens": 12, "return_token_ids": True}
    with running(plan, engine="serial") as s:
        assert s.routes.engine.name == "serial"
        choice = httpx.post(f"{s.url}/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["token_ids"] == list(ref.tokens)
