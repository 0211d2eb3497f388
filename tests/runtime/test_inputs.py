"""Bad generate()/stream() arguments: a ValueError naming the argument, before any work."""

import numpy as np
import pytest

from mirror_sd.runtime.prompts import encode_prompt
from tests.conftest import make_tokenizer
from tests.runtime.conftest import tiny_model


@pytest.fixture
def plan(tmp_path, plan_factory):
    """Target-only plan over a tiny qwen2 (vocab_size 97) with an id-decoding tokenizer."""
    return plan_factory(tiny_model(tmp_path, "qwen2", seed=0, num_hidden_layers=4), None)


def _both(plan, prompt, max_new_tokens):
    """generate() and stream() on the same arguments: each must raise (checked by callers)."""
    for call in (plan.generate, lambda *a: list(plan.stream(*a))):
        yield call, (prompt, max_new_tokens)


@pytest.mark.parametrize("bad", [-5, 0, 2.5, True, "8", None])
def test_max_new_tokens_must_be_a_positive_int(plan, bad):
    for call, args in _both(plan, [5, 6, 7], bad):
        with pytest.raises(ValueError, match=r"^max_new_tokens: expected a positive integer"):
            call(*args)
    assert len(plan.generate([5, 6, 7], 3).tokens) == 3  # the plan is still usable


def test_max_new_tokens_accepts_numpy_ints(plan):
    assert plan.generate([5, 6, 7], np.int64(4)).tokens == plan.generate([5, 6, 7], 4).tokens


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (None, "got None"),
        (42, "got int"),
        (b"w1 w2", "got bytes"),
        ({"role": "user", "content": "hi"}, "wrap one chat message in a list"),
        ([5, "w1"], "a list of int, str"),
        ([5, 6.0], "a list of float, int"),
        ([True, False], "a list of bool"),
        ([], "empty"),
    ],
)
def test_prompt_of_a_wrong_type(plan, bad, says):
    for call, args in _both(plan, bad, 4):
        with pytest.raises(ValueError, match=r"^prompt: ") as err:
            call(*args)
        assert says in str(err.value)
    assert len(plan.generate([5, 6], 2).tokens) == 2  # the busy lock was released


@pytest.mark.parametrize(("ids", "first_bad"), [([5, 97, 6], 97), ([5, -1], -1), ([10**9], 10**9)])
def test_token_ids_outside_the_target_vocabulary(plan, ids, first_bad):
    assert plan.target.vocab_size == 97
    for call, args in _both(plan, ids, 4):
        with pytest.raises(ValueError, match=rf"token id {first_bad} is outside .*\[0, 97\)"):
            call(*args)
    assert plan.generate([0, 96], 2).prompt_tokens == 2  # both ends of the range are fine


def test_token_ids_as_numpy_ints(plan):
    ids = np.array([5, 6, 7])
    assert plan.generate(ids, 4).tokens == plan.generate([5, 6, 7], 4).tokens


def test_text_that_is_not_utf8_encodable(plan):
    for call, args in _both(plan, "w1 \ud800 w2", 4):
        with pytest.raises(ValueError, match=r"^prompt: not valid Unicode .*'\\ud800' at index 3"):
            call(*args)


def test_encode_prompt_checks_with_a_real_tokenizer():
    tok = make_tokenizer(97)
    assert encode_prompt(tok, "w1 w2", chat=False) == encode_prompt(tok, [6, 7])
    for chat in (True, False):
        with pytest.raises(ValueError, match=r"^prompt: not valid Unicode"):
            encode_prompt(tok, "w1 \udfff", chat=chat)
    msgs = [{"role": "user", "content": "hi"}, {"role": "user", "content": "x\ud83d"}]
    with pytest.raises(ValueError, match=r"^prompt\[1\]\['content'\]: not valid Unicode"):
        encode_prompt(tok, msgs)
    with pytest.raises(ValueError, match=r"^prompt: encodes to no tokens"):
        encode_prompt(tok, "", chat=False)
    with pytest.raises(ValueError, match=r"token id 97 is outside .*\[0, 97\)"):
        encode_prompt(tok, [96, 97], vocab_size=97)
    assert encode_prompt(tok, [96, 97]) == [96, 97]  # no bound given: only negatives are refused
