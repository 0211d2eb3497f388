"""Many clients at once, a client that leaves mid-stream, a full queue."""

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.serve.conftest import MODEL, GatedPlan, client, metrics, running, wait_for


def _ask(server, i: int) -> str:
    """Request i: chat or completion, streamed or not, by i; returns the text."""
    c = client(server)
    prompt = f"w{i % 90} w{(i * 7) % 90}"
    if i % 2 == 0:
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12)
        if i % 4 == 0:
            return "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(**kwargs, stream=True)
                if ch.choices
            )
        return c.chat.completions.create(**kwargs).choices[0].message.content
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=12)
    if i % 4 == 1:
        return "".join(ch.choices[0].text for ch in c.completions.create(**kwargs, stream=True))
    return c.completions.create(**kwargs).choices[0].text


@pytest.mark.parametrize("engine", ["batch", "serial"])
def test_32_requests_from_8_clients_all_answered_exactly(plan, engine):
    refs = {}
    for i in range(32):
        prompt = f"w{i % 90} w{(i * 7) % 90}"
        chat = i % 2 == 0
        p = [{"role": "user", "content": prompt}] if chat else prompt
        refs[i] = plan.generate(p, 12, chat=chat).text
    with running(plan, engine=engine) as server:
        with ThreadPoolExecutor(8) as pool:
            answers = dict(
                zip(range(32), pool.map(lambda i: _ask(server, i), range(32)), strict=True)
            )
        m = metrics(server)
    assert answers == refs
    ok = sum(
        v for (name, labels), v in m.items()
        if name == "mirror_sd_requests_total" and ("status", "200") in labels
        and dict(labels)["endpoint"].startswith("/v1/")
    )  # fmt: skip
    assert ok == 32
    assert m[("mirror_sd_generations_total", (("outcome", "completed"),))] == 32
    assert m[("mirror_sd_queue_depth", ())] == 0 and m[("mirror_sd_running_requests", ())] == 0
    assert m[("mirror_sd_kv_rows_in_use", ())] == 0
    assert (m[("mirror_sd_batch_rounds_total", ())] > 0) == (engine == "batch")


@pytest.mark.parametrize("engine", ["batch", "serial"])
def test_disconnect_mid_stream_cancels_and_frees_the_slot(plan, engine):
    gated = GatedPlan(plan)
    with running(gated, max_queue=1, engine=engine) as server:
        stream = client(server).completions.create(
            model=MODEL, prompt="w10 w11 w12", max_tokens=200, stream=True
        )
        first = next(iter(stream))
        assert first.choices[0].text
        stream.close()  # the client goes away while its generation is held mid-way
        wait_for(
            lambda: metrics(server)[("mirror_sd_client_disconnects_total", ())] == 1,
            "the server to see the disconnect",
        )
        gated.gate.set()  # the engine sees the cancel at its next round boundary
        wait_for(
            lambda: (
                metrics(server).get(("mirror_sd_generations_total", (("outcome", "cancelled"),)))
                == 1
            ),
            "the generation to be cancelled",
        )
        m = metrics(server)
        assert m[("mirror_sd_generated_tokens_total", ())] < 200  # stopped, not run to the end
        assert (
            m[("mirror_sd_running_requests", ())] == 0 and m[("mirror_sd_kv_rows_in_use", ())] == 0
        )
        # the slot is free: the next request runs at once and is exact
        r = client(server).completions.create(model=MODEL, prompt="w40", max_tokens=8)
        assert r.choices[0].text == plan.generate("w40", 8, chat=False).text


def test_full_queue_answers_429_with_retry_after(plan):
    gated = GatedPlan(plan)
    with running(gated, max_queue=1) as server:
        held = client(server).completions.create(
            model=MODEL, prompt="w1 w2", max_tokens=8, stream=True
        )
        chunks = iter(held)
        next(chunks)  # the first request runs (held at the gate)
        waiting = threading.Thread(
            target=lambda: client(server).completions.create(model=MODEL, prompt="w3", max_tokens=4)
        )
        waiting.start()
        wait_for(lambda: server.engine.stats().queued == 1, "the second request to queue")
        with pytest.raises(openai.RateLimitError) as err:
            client(server).completions.create(model=MODEL, prompt="w4", max_tokens=4)
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.response.json()["error"]["code"] == "queue_full"
        gated.gate.set()
        assert "".join(c.choices[0].text for c in chunks)  # the held one finishes
        waiting.join()
        m = metrics(server)
        assert (
            m[("mirror_sd_requests_total", (("endpoint", "/v1/completions"), ("status", "429")))]
            == 1
        )
        assert m[("mirror_sd_generations_total", (("outcome", "completed"),))] == 2


def test_non_streaming_client_that_leaves_cancels_its_generation(plan):
    gated = GatedPlan(plan)
    with running(gated) as server:
        body = json.dumps({"model": MODEL, "prompt": "w10 w11", "max_tokens": 200}).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head + body)
            assert gated.started.wait(60)  # generating, held mid-way; then the client leaves
        wait_for(
            lambda: metrics(server)[("mirror_sd_client_disconnects_total", ())] == 1,
            "the server to see the client leave",
        )
        gated.gate.set()
        wait_for(
            lambda: (
                metrics(server).get(("mirror_sd_generations_total", (("outcome", "cancelled"),)))
                == 1
            ),
            "the generation to be cancelled",
        )
        m = metrics(server)
        assert (
            m[("mirror_sd_requests_total", (("endpoint", "/v1/completions"), ("status", "499")))]
            == 1
        )
        assert m[("mirror_sd_generated_tokens_total", ())] < 200
