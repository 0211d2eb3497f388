"""/metrics parses as Prometheus text and counts what the requests did."""

import openai
import pytest

from tests.serve.conftest import MODEL, client, metrics, running


def _get(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_and_rounds(plan):
    with running(plan) as server:
        c = client(server)
        chat = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "w1 w2"}], max_tokens=10
        )
        chunks = list(
            c.completions.create(
                model=MODEL, prompt="w40", max_tokens=6, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL, prompt="w1", max_tokens=0)
        m = metrics(server)
    chat_ep, comp_ep = "/v1/chat/completions", "/v1/completions"
    assert _get(m, "mirror_sd_requests_total", endpoint=chat_ep, status="200") == 1
    assert _get(m, "mirror_sd_requests_total", endpoint=comp_ep, status="200") == 1
    assert _get(m, "mirror_sd_requests_total", endpoint=comp_ep, status="400") == 1
    assert _get(m, "mirror_sd_request_latency_seconds_count", endpoint=chat_ep) == 1
    assert _get(m, "mirror_sd_request_latency_seconds_count", endpoint=comp_ep) == 2
    assert _get(m, "mirror_sd_time_to_first_token_seconds_count", endpoint=chat_ep) == 1
    assert _get(m, "mirror_sd_time_to_first_token_seconds_count", endpoint=comp_ep) == 1
    usage = chunks[-1].usage
    generated = chat.usage.completion_tokens + usage.completion_tokens
    assert _get(m, "mirror_sd_generated_tokens_total") == generated == 16
    assert (
        _get(m, "mirror_sd_prompt_tokens_total") == chat.usage.prompt_tokens + usage.prompt_tokens
    )
    rounds = _get(m, "mirror_sd_rounds_total")
    assert rounds >= 1 and _get(m, "mirror_sd_tokens_per_round_count") == rounds
    assert _get(m, "mirror_sd_tokens_per_round_sum") >= generated  # the last round may overshoot
    assert 0 < _get(m, "mirror_sd_branch_rounds_total") <= rounds  # mirror rounds roll out branches
    assert _get(m, "mirror_sd_branch_hits_total") <= _get(m, "mirror_sd_branch_rounds_total")
    assert _get(m, "mirror_sd_accepted_draft_tokens_total") <= _get(
        m, "mirror_sd_drafted_tokens_total"
    )
    assert _get(m, "mirror_sd_queue_wait_seconds_count") == 2
    assert _get(m, "mirror_sd_draft_fallbacks_total") == 0
    assert _get(m, "mirror_sd_kv_rows_capacity") == 256
    assert _get(m, "mirror_sd_draft_disabled") == 0
