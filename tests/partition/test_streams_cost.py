"""The streamed chain's expected time (partition.profile.streamed_chain_time) and the profile's
choice between it and one token per draft forward."""

from __future__ import annotations

import pytest

from mirror_sd.partition.profile import Profile, streamed_chain_time


def flat(rows: int) -> float:
    return 1.0


@pytest.mark.parametrize(
    ("gamma", "accuracy", "forwards"),
    [
        (6, (1.0, 1.0), 3),
        (6, (0.0, 0.0), 6),
        (4, (1.0,), 3),
        (1, (1.0, 1.0), 1),
        (5, (1.0, 1.0), 3),
    ],
)
def test_forwards_at_the_extremes(gamma, accuracy, forwards):
    """Every guess right: 1 token, then up to k + 1 per forward; none right: γ forwards."""
    assert streamed_chain_time(gamma, accuracy, flat) == pytest.approx(forwards)


def test_expectation_by_hand():
    """γ = 3, one stream of accuracy a: forward 1 yields t1 and a guess; forward 2 checks it:
    right (a): t2, t3 in that forward; wrong: t2, then a third forward for t3."""
    a = 0.3
    rows = {1: 1.0, 2: 1.5}
    got = streamed_chain_time(3, (a,), rows.__getitem__)
    # forward 1: 1 real + 1 stream (2 rows); forward 2: 1 real + 1 guess (2 rows, no stream:
    # one token is left after it); on a miss, forward 3: 1 row
    assert got == pytest.approx(1.5 + 1.5 + (1 - a) * 1.0)


def test_profile_takes_the_cheaper_chain_and_round_trips():
    cheap = Profile(num_layers=4, t_target={1: 1.0}, t_draft={1: 1.0, 8: 1.1},
                    stream_accuracy=(0.7, 0.5))  # fmt: skip
    dear = Profile(num_layers=4, t_target={1: 1.0}, t_draft={1: 1.0, 8: 8.0},
                   stream_accuracy=(0.7, 0.5))  # fmt: skip
    assert cheap.streams_pay(5) and cheap.chain(5) < 5.0
    assert not dear.streams_pay(5) and dear.chain(5) == 5.0
    plain = Profile(num_layers=4, t_target={1: 1.0}, t_draft={1: 1.0})
    assert not plain.streams_pay(5) and plain.chain(5) == 5.0
    assert Profile.from_dict(cheap.to_dict()) == cheap
