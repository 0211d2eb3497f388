"""The size and shape of a speculative round's token tree, from measured costs (#25).

A speculative round with `tree_siblings` verifies the draft's chain d_1..d_γ plus, at depth j,
the draft's next s_j best tokens of the same row as sibling leaves (`TokenTree.with_siblings`).
A leaf pays when the chain breaks at depth j and the target's token is one of those s_j
siblings: the round then commits the leaf and the target's token after it, one more than the
chain alone. So, with the chain's per-token acceptance α and the sibling coverage β_s (the
probability that the target's token is among the draft's next s best when it is not the
draft's first choice, `Profile.sibling_coverage`):

    E[L](s_1..s_γ) = E[L]_chain + Σ_j α^{j-1}·(1 − α)·β_{s_j}
    t_round        = t_chain(γ) + t_T(1 + γ + Σ_j s_j)        (t_T: the measured block cost)

`choose_tree` grows the tree one leaf at a time where it raises E[L] / t_round most and stops
when no leaf pays: depth j is reached with probability α^{j-1}, so leaves go to the shallow
depths first (the shape), and a target whose block cost grows steeply gets few or none (the
size). Coverage is measured at the positions of a teacher-forced calibration text, one value
per s for every depth (ASSUMED depth-independent). Pure: numbers in, a `TreeChoice` out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mirror_sd.graphs.model import ROW_INVARIANT_ROWS
from mirror_sd.partition.block_bounds import tree_rounding
from mirror_sd.partition.cost_model import DEFAULT_ACCEPT_RATE, Profile, expected_tokens
from mirror_sd.partition.device_map import DeviceSpec
from mirror_sd.partition.spec_config import SpecConfig

MAX_TREE_SIBLINGS = 4  # siblings per depth the profile measures coverage for (and auto tries)


@dataclass(frozen=True)
class TreeChoice:
    """A tree shape and the latency model's predictions for it and for the plain chain."""

    shape: tuple[int, ...]  # sibling leaves per depth 1..γ
    rows: int  # verification rows: the root, the chain and every leaf
    expected_tokens: float  # E[L] per round with the tree
    chain_tokens: float  # E[L] per round of the chain alone
    t_round: float  # seconds per round with the tree
    t_round_chain: float
    speedup: float  # over autoregressive decoding, with the tree
    speedup_chain: float

    def explain(self) -> str:
        """One line: the shape and why (the predicted tokens, round times and speedups)."""
        ms = lambda t: f"{t * 1e3:.1f} ms"  # noqa: E731
        what = "token tree sized for speculative rounds (what tree_siblings: auto runs)"
        if not any(self.shape):
            return (
                f"{what}: none, no leaf pays (chain {self.chain_tokens:.2f} tokens per "
                f"{ms(self.t_round_chain)} round, {self.speedup_chain:.2f}x autoregressive)"
            )
        return (
            f"{what}: {list(self.shape)} sibling leaves per depth, {self.rows} rows: "
            f"{self.expected_tokens:.2f} tokens per {ms(self.t_round)} round "
            f"({self.speedup:.2f}x autoregressive) against the chain's {self.chain_tokens:.2f} per "
            f"{ms(self.t_round_chain)} ({self.speedup_chain:.2f}x)"
        )


def tree_tokens(alpha: float, shape: Sequence[int], coverage: Sequence[float]) -> float:
    """E[L] of a speculative round whose depth j (1-based) has shape[j-1] sibling leaves."""
    gamma = len(shape)
    gain = sum(alpha**j * (1 - alpha) * covered(coverage, s) for j, s in enumerate(shape))
    return expected_tokens(alpha, gamma) + gain


def covered(coverage: Sequence[float], siblings: int) -> float:
    """β_s: the measured coverage of `siblings` next-best tokens (0 for none)."""
    if siblings <= 0:
        return 0.0
    if siblings > len(coverage):
        raise ValueError(f"sibling coverage measured for s <= {len(coverage)}, not {siblings}")
    return coverage[siblings - 1]


def choose_tree(
    alpha: float,
    gamma: int,
    coverage: Sequence[float],
    t_chain: float,
    t_target: Callable[[int], float],
    max_rows: int,
) -> TreeChoice:
    """The tree shape maximizing predicted tokens per second (module docstring).

    `t_chain`: the draft's chain of γ tokens; `t_target(n)`: the target's block of n rows
    (n = 1 is the autoregressive step); `max_rows`: the largest block that may be verified
    (the row-invariance limit and the profile's measured range). Ties keep the smaller tree.
    """
    shape = [0] * gamma
    t_ar = t_target(1)

    def rate(sh: Sequence[int]) -> float:
        return tree_tokens(alpha, sh, coverage) / (t_chain + t_target(1 + gamma + sum(sh)))

    best = rate(shape)
    while 1 + gamma + sum(shape) < max_rows:
        options = []
        for j in range(gamma):
            if shape[j] < len(coverage):
                trial = shape[:j] + [shape[j] + 1] + shape[j + 1 :]
                options.append((rate(trial), -j, trial))
        if not options:
            break
        r, _, trial = max(options)
        if r <= best:
            break
        best, shape = r, trial
    rows = 1 + gamma + sum(shape)
    tokens, chain = tree_tokens(alpha, shape, coverage), expected_tokens(alpha, gamma)
    t_round, t_round_chain = t_chain + t_target(rows), t_chain + t_target(1 + gamma)
    return TreeChoice(
        shape=tuple(shape), rows=rows, expected_tokens=tokens, chain_tokens=chain,
        t_round=t_round, t_round_chain=t_round_chain, speedup=tokens * t_ar / t_round,
        speedup_chain=chain * t_ar / t_round_chain,
    )  # fmt: skip


def sized_tree(prof: Profile, spec: SpecConfig, t_spec: DeviceSpec) -> TreeChoice | None:
    """The speculative round's token tree the cost model sizes for this profile at the
    plan's γ (`partition.tree_shape`), or None where trees would not stay lossless on the
    target (`tree_rounding`) or the profile has no sibling coverage."""
    if tree_rounding(t_spec) or not prof.sibling_coverage:
        return None
    gamma = spec.num_draft_tokens
    alpha = prof.accept_rate if prof.accept_rate is not None else DEFAULT_ACCEPT_RATE
    rows = min(ROW_INVARIANT_ROWS, max(prof.t_target))
    return choose_tree(alpha, gamma, prof.sibling_coverage, prof.chain(gamma), prof.target, rows)


def resolve_tree(
    prof: Profile | None, spec: SpecConfig, t_spec: DeviceSpec
) -> tuple[SpecConfig, TreeChoice | None]:
    """(`spec` with `tree_siblings: auto` made concrete, the tree sized for it). Leaves go only
    where speculative rounds of the draft verify them: another mode, no draft (retrieval
    alone), no profile, or a target where trees round differently (`tree_rounding`) resolves
    auto to 0 (a chain)."""
    tree = sized_tree(prof, spec, t_spec) if prof is not None else None
    if spec.tree_siblings == "auto":
        use = tree is not None and spec.mode == "speculative" and spec.model_draft
        spec = spec.with_(tree_siblings=tree.shape if use else 0)
    return spec, tree
