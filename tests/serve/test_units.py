"""The pure parts: stop strings cut the OpenAI way, request parsing into GenRequest."""

import pytest

from mirror_sd.serve.errors import ApiError
from mirror_sd.serve.schemas import CHAT, COMPLETION, parse
from mirror_sd.serve.stops import StopCutter


def _run(stops, pieces) -> tuple[list[str], bool]:
    cut = StopCutter(stops)
    out = [cut.feed(p) for p in pieces] + [cut.finish()]
    return out, cut.stopped


def test_stop_cutter_holds_back_a_possible_stop_and_cuts_at_it():
    out, stopped = _run(["END"], ["abc E", "N", "D more"])
    assert out == ["abc ", "", "", ""] and stopped
    out, stopped = _run(["END"], ["abc E", "x", "yz"])  # the held "E" was not a stop after all
    assert "".join(out) == "abc Exyz" and not stopped
    out, stopped = _run(["b", "xy"], ["aaxyb"])  # the earliest stop wins
    assert "".join(out) == "aa" and stopped
    assert _run([], ["a", "b"])[0] == ["a", "b", ""]


def test_parse_maps_openai_fields_onto_plan_kwargs():
    req = parse(
        CHAT,
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0.5, "top_p": 0.9,
         "seed": 3, "stop": "x", "user": "ignored"},
        default_max_tokens=100,
    )  # fmt: skip
    assert req.prompt == [{"role": "user", "content": "hi"}] and req.max_tokens == 5
    assert req.plan_kwargs() == {"seed": 3, "chat": True, "stop_strings": ["x"],
                                 "temperature": 0.5, "top_p": 0.9}  # fmt: skip
    comp = parse(COMPLETION, {"model": "m", "prompt": [[1, 2, 3]]}, default_max_tokens=100)
    assert comp.prompt == [1, 2, 3] and not comp.chat and comp.max_tokens == 100
    assert parse(COMPLETION, {"model": "m", "prompt": "a", "seed": 0}, 1).seed == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "a", "seed": 1.5}, "seed"),
        ({"model": "m", "prompt": 7}, "prompt"),
        ({"model": "m", "prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": "m", "prompt": "a", "stop": [""]}, "stop"),
        ({"model": 3, "prompt": "a"}, "model"),
    ],
)
def test_parse_names_the_bad_field(body, param):
    with pytest.raises(ApiError) as err:
        parse(COMPLETION, body, default_max_tokens=16)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.message.startswith(param)
