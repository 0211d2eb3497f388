"""The batched engine: requests join a running batch at a round boundary, each stays exactly
its batch-1 output (greedy and sampled), a client that leaves frees its rows for a waiting one.
Nothing is timed: held rounds wait on a gate (GatedPlan)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mirror_sd.serve.batch_engine import BatchEngine
from mirror_sd.serve.config import ServeConfig
from mirror_sd.serve.engine import SerialEngine
from tests.serve.conftest import MODEL, GatedPlan, client, metrics, running, wait_for


def _get(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def _joined_the_first(gated: GatedPlan) -> bool:
    """Some round ran the session's first sequence (handle 0) beside others: they joined its
    running batch rather than waiting for it to end."""
    return any(0 in r and len(r) > 1 for r in gated.rounds)


def _rounds_with_several(m) -> float:
    """Rounds of the batched engine that ran more than one sequence."""
    return _get(m, "mirror_sd_batch_size_count") - _get(m, "mirror_sd_batch_size_bucket", le="1.0")


def test_batch_is_the_default_engine_and_serial_an_option(plan):
    assert ServeConfig(MODEL).engine == "batch"
    with pytest.raises(ValueError, match="--engine 'x'"):
        ServeConfig(MODEL, engine="x")
    with running(plan) as server:
        assert isinstance(server.engine, BatchEngine)
    with running(plan, engine="serial") as server:
        assert isinstance(server.engine, SerialEngine)
        r = client(server).completions.create(model=MODEL, prompt="w5 w6", max_tokens=8)
        assert r.choices[0].text == plan.generate("w5 w6", 8, chat=False).text


class _Unbatchable:
    """A plan whose settings a batch session does not take (e.g. a hand-built plan)."""

    def __init__(self, plan):
        self._plan = plan

    def __getattr__(self, name):
        return getattr(self._plan, name)

    def batch_session(self, *args, **kwargs):
        raise ValueError("mode 'auto' is resolved by compile()")


def test_a_plan_that_cannot_batch_is_served_serially(plan):
    with running(_Unbatchable(plan)) as server:
        assert isinstance(server.engine, SerialEngine)
        r = client(server).completions.create(model=MODEL, prompt="w5 w6", max_tokens=8)
        assert r.choices[0].text == plan.generate("w5 w6", 8, chat=False).text


def _completion(server, prompt, **kwargs) -> str:
    return client(server).completions.create(model=MODEL, prompt=prompt, **kwargs).choices[0].text


def test_requests_join_the_running_batch_and_stay_exact(plan):
    long_ref = plan.generate("w20 w21", 48, chat=False)
    assert len(long_ref.tokens) == 48  # it outlives the rounds the others need to join
    late = {f"w{30 + i} w{31 + i}": dict(max_tokens=10) for i in range(3)}
    late["w12 w13"] = dict(max_tokens=10, stop=[" w40"])  # a stop string inside the batch
    refs = {
        p: plan.generate(p, kw["max_tokens"], chat=False, stop_strings=kw.get("stop", [])).text
        for p, kw in late.items()
    }
    assert refs["w12 w13"].count(" w40") == 1 and refs["w12 w13"].endswith(" w40")
    gated = GatedPlan(plan)
    with running(gated) as server:
        first = client(server).completions.create(
            model=MODEL, prompt="w20 w21", max_tokens=48, stream=True
        )
        chunks = iter(first)
        text = next(chunks).choices[0].text  # round 1 ran; the engine waits at the gate
        with ThreadPoolExecutor(len(late)) as pool:
            futures = {p: pool.submit(_completion, server, p, **kw) for p, kw in late.items()}
            wait_for(lambda: server.engine.stats().queued == len(late), "the others to queue")
            assert server.engine.stats().running == 1
            gated.gate.set()  # they are admitted at the next boundary, beside the first
            text += "".join(c.choices[0].text for c in chunks)
            answers = {p: f.result() for p, f in futures.items()}
        m = metrics(server)
    assert text == long_ref.text
    # the stop string's request ends before it (the plan's text keeps it), the others whole
    assert answers == {p: refs[p].split(" w40")[0] if "stop" in kw else refs[p]
                       for p, kw in late.items()}  # fmt: skip
    assert _rounds_with_several(m) >= 1  # more than one sequence was live in a round
    assert _joined_the_first(gated) and len(gated.rounds[0]) == 1
    assert _get(m, "mirror_sd_batch_rounds_total") == _get(m, "mirror_sd_batch_size_count")
    assert _get(m, "mirror_sd_generations_total", outcome="completed") == 1 + len(late)
    assert _get(m, "mirror_sd_running_requests") == 0 and _get(m, "mirror_sd_kv_rows_in_use") == 0


def test_sampled_requests_in_one_batch_equal_their_batch_1_samples(plan):
    asks = [dict(temperature=0.9, top_p=0.8, seed=7), dict(temperature=1.0, seed=5, top_k=3),
            dict(temperature=0.7, seed=11), dict(temperature=0.0, seed=3)]  # fmt: skip
    refs = [plan.generate("w3 w4", 16, chat=False, **a).text for a in asks]
    assert len(set(refs)) == len(refs)  # the seeds and settings matter
    gated = GatedPlan(plan)
    answers: list = [None] * len(asks)

    def ask(i):
        a = dict(asks[i])
        extra = {"top_k": a.pop("top_k")} if "top_k" in a else None
        answers[i] = _completion(server, "w3 w4", max_tokens=16, extra_body=extra, **a)

    with running(gated) as server:
        held = client(server).completions.create(
            model=MODEL, prompt="w20 w21", max_tokens=40, stream=True
        )
        chunks = iter(held)
        next(chunks)  # the batch runs, held at the gate: the sampled ones all join it together
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        wait_for(lambda: server.engine.stats().queued == len(asks), "the requests to queue")
        gated.gate.set()
        for t in threads:
            t.join()
        list(chunks)
        m = metrics(server)
    assert answers == refs
    assert _rounds_with_several(m) >= 1 and _joined_the_first(gated)


def test_disconnect_frees_the_rows_a_waiting_request_needs(plan):
    """The first request reserves most of the cache (prompt + 200 + slack of 256 rows), so the
    second cannot join beside it; when its client leaves, its rows free and the second runs."""
    gated = GatedPlan(plan)
    with running(gated) as server:
        stream = client(server).completions.create(
            model=MODEL, prompt="w10 w11 w12", max_tokens=200, stream=True
        )
        assert next(iter(stream)).choices[0].text
        second: dict = {}
        waiting = threading.Thread(
            target=lambda: second.update(text=_completion(server, "w40", max_tokens=8))
        )
        waiting.start()
        wait_for(lambda: server.engine.stats().queued == 1, "the second request to queue")
        assert server.engine.stats().running == 1
        stream.close()  # the client goes away while its round is held
        wait_for(
            lambda: metrics(server)[("mirror_sd_client_disconnects_total", ())] == 1,
            "the server to see the disconnect",
        )
        gated.gate.set()
        waiting.join()
        m = metrics(server)
    assert second["text"] == plan.generate("w40", 8, chat=False).text
    assert _get(m, "mirror_sd_generations_total", outcome="cancelled") == 1
    assert _get(m, "mirror_sd_generations_total", outcome="completed") == 1
    assert _get(m, "mirror_sd_generated_tokens_total") < 200 + 8  # the first one stopped early
    assert _get(m, "mirror_sd_running_requests") == 0 and _get(m, "mirror_sd_kv_rows_in_use") == 0
