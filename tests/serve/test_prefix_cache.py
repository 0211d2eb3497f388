"""Prefix caching in the server: a multi-turn chat through the official openai client reuses
the K/V rows of its earlier turns (/metrics counts the hits and the prompt tokens not
prefilled), and every answer equals the one a server without the cache gives."""

import pytest

from tests.serve.conftest import MODEL, client, metrics, running


def _chat(server, turns: list[str]) -> list[str]:
    c, messages, answers = client(server), [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        answers.append(reply.choices[0].message.content)
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


@pytest.mark.parametrize("engine", ["batch", "serial"])
def test_a_chat_reuses_its_history_and_answers_the_same(plan, engine):
    turns = ["w1 w2 w3", "w4 w5", "w6 w7 w8"]
    with running(plan, engine=engine) as server:  # off by default
        plain = _chat(server, turns)
        m = metrics(server)
    assert m[("mirror_sd_prefix_cache_hits_total", ())] == 0
    with running(plan, engine=engine, prefix_cache=True) as server:
        cached = _chat(server, turns)
        m = metrics(server)
    assert cached == plain
    assert m[("mirror_sd_prefix_cache_hits_total", ())] == 2  # turns 2 and 3
    assert m[("mirror_sd_prefix_cache_reused_tokens_total", ())] > 10
    assert m[("mirror_sd_prefix_cache_hit_rate", ())] == pytest.approx(2 / 3)
