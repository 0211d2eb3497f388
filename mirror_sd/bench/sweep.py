"""`mirror-sd bench --sweep PROFILE`: the cost model's predictions over an (ℓe, κ, γ) grid.

Evaluated from a profile measured on the real devices (the one `compile()` measured, saved
beside a benchmark's results as profile.json), so the table shows *why* the partitioner
chose its settings: every figure is a PREDICTION of the latency model in docs/algorithm.md, with
the branch budget B chosen per cell as `choose()` would.
"""

from __future__ import annotations

import itertools

from mirror_sd.bench.report import cell, markdown_table
from mirror_sd.partition import Profile, SpecConfig, choose


def sweep(profile: Profile, exit_layers=None, kappas=(1, 2, 4, 8), gammas=None) -> list:
    """One `Choice` per (ℓe, κ, γ); ℓe defaults to the profile's measured layers and γ to
    the block sizes it measured (γ + 1 <= the largest t_T row count)."""
    layers = exit_layers or sorted(profile.hit_rate_by_exit_layer) or [profile.num_layers // 2]
    gammas = gammas or [g for g in range(1, 9) if g + 1 <= max(profile.t_target)]
    return [
        choose(
            profile,
            SpecConfig(exit_layer=le, exit_top_k=k, num_draft_tokens=g),
            prefer_hidden=False,
        )  # fmt: skip
        for le, k, g in itertools.product(layers, kappas, gammas)
    ]


def markdown(choices: list, profile: Profile) -> str:
    header = ["ℓe", "κ", "γ", "B", "exit agreement", "hit rate h", "E[L]", "mirror round ms",
              "vanilla round ms", "mirror × (PREDICTED)", "vanilla × (PREDICTED)"]  # fmt: skip
    best = max(choices, key=lambda c: c.speedup_mirror)
    rows = [
        [str(c.exit_layer), str(c.exit_top_k), str(c.num_draft_tokens), str(c.branch_budget),
         cell(c.agreement), cell(c.hit_rate, ".3f"), cell(c.expected_tokens),
         cell(c.t_round_mirror * 1e3, ".0f"), cell(c.t_round_vanilla * 1e3, ".0f"),
         ("**" + cell(c.speedup_mirror) + "**") if c is best else cell(c.speedup_mirror),
         cell(c.speedup_vanilla)]
        for c in choices
    ]  # fmt: skip
    head = (
        f"PREDICTED by the cost model from a measured profile ({profile.description}); "
        f"α = {profile.accept_rate}, overlap slowdown f = {profile.overlap_slowdown}, exit head "
        f"{profile.t_exit_head * 1e3:.1f} ms. Best mirror cell in bold."
    )
    return "\n".join([head, "", *markdown_table(header, rows)])
