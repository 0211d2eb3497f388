"""The cost model sizes and shapes a speculative round's token tree (partition/tree_shape.py)."""

from __future__ import annotations

import random

import pytest

from mirror_sd.partition import Profile, SpecConfig
from mirror_sd.partition.cost_model import expected_tokens
from mirror_sd.partition.device_map import OrtSpec, TorchSpec
from mirror_sd.partition.tree_shape import choose_tree, resolve_tree, tree_tokens

COVERAGE = (0.35, 0.5, 0.58, 0.63)  # β_1..β_4: non-decreasing, diminishing gains


def _linear(per_row: float):
    return lambda n: 1.0 + per_row * (n - 1)  # t_T(n): one row costs 1


def test_tree_tokens_matches_a_simulated_round():
    """E[L] with leaves, against rounds drawn at random under the same model: each draft token
    holds with probability α; at the first miss the target's token is a leaf with β_s."""
    alpha, shape = 0.6, (3, 1, 0, 2)
    rng, total, n = random.Random(0), 0, 200_000
    for _ in range(n):
        k = 0
        while k < len(shape) and rng.random() < alpha:
            k += 1
        tokens = k + 1
        if k < len(shape) and shape[k] and rng.random() < COVERAGE[shape[k] - 1]:
            tokens += 1  # the leaf, then the target's token after it
        total += tokens
    assert tree_tokens(alpha, shape, COVERAGE) == pytest.approx(total / n, abs=0.01)
    assert tree_tokens(alpha, (0, 0, 0, 0), COVERAGE) == pytest.approx(expected_tokens(alpha, 4))


def test_leaves_go_to_shallow_depths_first_and_only_while_they_pay():
    cheap = choose_tree(0.6, 4, COVERAGE, t_chain=1.0, t_target=_linear(0.01), max_rows=64)
    assert any(cheap.shape) and cheap.speedup > cheap.speedup_chain
    assert list(cheap.shape) == sorted(cheap.shape, reverse=True)  # reach falls with depth
    assert cheap.rows == 1 + 4 + sum(cheap.shape)
    dear = choose_tree(0.6, 4, COVERAGE, t_chain=1.0, t_target=_linear(0.05), max_rows=64)
    assert sum(dear.shape) < sum(cheap.shape)  # a steeper block cost buys fewer leaves
    steep = choose_tree(0.6, 4, COVERAGE, t_chain=1.0, t_target=_linear(0.5), max_rows=64)
    assert steep.shape == (0, 0, 0, 0) and "no leaf pays" in steep.explain()
    none = choose_tree(0.6, 4, (0.0,) * 4, t_chain=1.0, t_target=_linear(0.0), max_rows=64)
    assert none.shape == (0, 0, 0, 0)  # leaves that never hold never pay
    capped = choose_tree(0.6, 4, COVERAGE, t_chain=1.0, t_target=_linear(0.0), max_rows=8)
    assert capped.rows <= 8 and sum(capped.shape) == 3


def test_auto_resolves_only_for_speculative_rounds_on_exact_targets():
    prof = Profile(num_layers=4, t_target={1: 1.0, 16: 1.15}, t_draft={1: 0.1},
                   accept_rate=0.6, sibling_coverage=COVERAGE)  # fmt: skip
    spec = SpecConfig(mode="speculative", tree_siblings="auto")
    resolved, tree = resolve_tree(prof, spec, OrtSpec("t", quantize="int4"))
    assert any(resolved.tree_shape) and resolved.tree_siblings == tree.shape
    assert resolve_tree(prof, spec.with_(mode="mirror"), OrtSpec("t"))[0].tree_siblings == 0
    rounding = TorchSpec("t", quantize="int4")  # a tree's rounding would change tokens there
    assert resolve_tree(prof, spec, rounding) == (spec.with_(tree_siblings=0), None)
    assert resolve_tree(None, spec, OrtSpec("t"))[0].tree_siblings == 0


def test_tree_siblings_takes_an_int_a_list_per_depth_or_auto():
    assert SpecConfig(tree_siblings=2).tree_shape == (2, 2, 2, 2)
    assert SpecConfig(tree_siblings=[3, 1]).tree_shape == (3, 1, 0, 0)  # a YAML list
    sized = SpecConfig(tree_siblings=(2, 1, 1, 0))  # a compiled shape, then a call with γ = 2
    assert sized.with_(num_draft_tokens=2).tree_shape == (2, 1)
    with pytest.raises(ValueError, match="resolved by compile"):
        _ = SpecConfig(tree_siblings="auto").tree_shape
    for bad in (-1, "wide", True, [1, -1], [1, 1.5]):
        with pytest.raises(ValueError, match="speculation.tree_siblings"):
            SpecConfig(tree_siblings=bad)


def test_profile_keeps_sibling_coverage_and_checks_it():
    prof = Profile(num_layers=4, t_target={1: 1.0}, t_draft={1: 0.1}, sibling_coverage=COVERAGE)
    assert Profile.from_dict(prof.to_dict()).sibling_coverage == COVERAGE
    with pytest.raises(ValueError, match="sibling_coverage"):
        Profile(num_layers=4, t_target={1: 1.0}, t_draft={1: 0.1}, sibling_coverage=(0.5, 0.4))
