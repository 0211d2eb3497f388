"""Cost model: the Mirror-SD latency model over measured timings (`partition.profile.Profile`)
and `choose()`.

The formulas are docs/algorithm.md's "Latency model", one function each (times in seconds):

    t_pre = (ℓe / N) · t_T(γ+1)            t_suf = t_T(γ+1) − t_pre
    vanilla round = γ·t_d(1) + t_T(γ+1)
    mirror round  = t_T(γ+1) + t_sync + max(0, t_chan + γ·t_d(B) − t_suf) + (1 − h)·γ·t_d(1)
    E[L] = (1 − α^{γ+1}) / (1 − α)         speedup = E[L] · t_T(1) / E[T_round]

`choose()` adds the exit head's own time to the target's block time (it runs on the target
device between prefix and suffix) and models the hit rate h(ℓe, κ, B) as the probability
mass of the B most valuable branches (see `branch_masses`). Pure: numbers in, numbers out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from mirror_sd.partition.profile import Profile, interpolate
from mirror_sd.partition.spec_config import SpecConfig

GAMMA_RANGE = tuple(range(1, 9))  # γ searched when the caller asks (or SpecConfig says "auto")
TOP_K_RANGE = (1, 2, 4, 8)  # κ searched likewise
# ASSUMED α when a profile has no measured acceptance rate.
DEFAULT_ACCEPT_RATE = 0.6
# ASSUMED exit-head top-1 agreement with the target's token vs depth fraction ℓe/N, used when
# a profile has no measurement: the shape the logit-lens literature reports for an untrained
# exit head (final norm + LM head applied early): near zero in the first quarter, rising
# steeply over the last third. docs/training.md has measurements for trained heads.
ASSUMED_AGREEMENT_BY_DEPTH = {0.0: 0.0, 0.25: 0.10, 0.5: 0.30, 0.75: 0.60, 1.0: 1.0}


def prefix_time(t_block: float, exit_layer: int, num_layers: int) -> float:
    """t_pre ≈ (ℓe/N)·t_T: layers [0, ℓe) of a uniform-layer target."""
    return exit_layer / num_layers * t_block


def suffix_time(t_block: float, exit_layer: int, num_layers: int) -> float:
    """t_suf = t_T − t_pre: layers [ℓe, N), final norm and LM head."""
    return t_block - prefix_time(t_block, exit_layer, num_layers)


def vanilla_round_time(t_block: float, t_draft_1: float, gamma: int) -> float:
    """Vanilla speculative decoding: γ serial draft steps, then one verification forward."""
    return gamma * t_draft_1 + t_block


def mirror_round_time(
    t_block: float,
    t_suf: float,
    t_draft_b: float,
    t_draft_1: float,
    gamma: int,
    hit_rate: float,
    t_sync: float = 0.0,
    t_chan: float = 0.0,
    slowdown: float = 1.0,
) -> float:
    """Mirror-SD: the verification forward, the part of the branch rollouts (γ steps over
    B rows) that outlasts the suffix, and on a miss (probability 1 − h) γ fresh draft steps.
    While they overlap, suffix and rollouts both take `slowdown` times longer."""
    exposed = max(0.0, t_chan + (gamma * t_draft_b - t_suf) * slowdown)
    return t_block + (slowdown - 1) * t_suf + t_sync + exposed + (1 - hit_rate) * gamma * t_draft_1


def expected_tokens(alpha: float, gamma: int) -> float:
    """E[L] = (1 − α^{γ+1}) / (1 − α): tokens committed per round (γ+1 when α = 1)."""
    return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def speedup(tokens_per_round: float, t_target_1: float, t_round: float) -> float:
    """Speedup over autoregressive decoding: E[L] · t_T(1) / E[T_round]."""
    return tokens_per_round * t_target_1 / t_round


# --- hit-rate model ---------------------------------------------------------------------


def stop_probs(alpha: float, gamma: int) -> list[float]:
    """P(accepted length a = j), j = 0..γ: α^j·(1−α) for j < γ, α^γ for j = γ."""
    return [alpha**j * (1 - alpha) for j in range(gamma)] + [alpha**gamma]


def branch_masses(alpha: float, gamma: int, kappa: int, agreement: float) -> list[float]:
    """P(verdict = branch) for every branch, most valuable first.

    Model (ASSUMED): the correction's rank among the exit candidates is geometric,
    P(rank r) = a·(1−a)^{r−1} with a = top-1 `agreement`. At depth j < γ one of the κ
    candidates is the draft's own token, so κ−1 branches (ranks 1..κ−1); at depth γ
    (bonus) κ branches. Branch value = P(stop at j) · P(rank r), as docs/algorithm.md orders them.
    """
    masses = []
    for j, p_stop in enumerate(stop_probs(alpha, gamma)):
        ranks = kappa if j == gamma else kappa - 1
        masses += [p_stop * agreement * (1 - agreement) ** r for r in range(ranks)]
    return sorted(masses, reverse=True)


def hit_rate(alpha: float, gamma: int, kappa: int, budget: int, agreement: float) -> float:
    """h(ℓe, κ, B): the mass of the `budget` most valuable branches (top-κ coverage × budget share)."""
    return min(1.0, sum(branch_masses(alpha, gamma, kappa, agreement)[:budget]))


def exit_agreement(profile: Profile, exit_layer: int) -> tuple[float, str]:
    """(top-1 agreement at ℓe, where it came from: 'measured' | 'interpolated' | 'ASSUMED')."""
    table = profile.hit_rate_by_exit_layer
    if exit_layer in table:
        return table[exit_layer], "measured"
    if table and min(table) < exit_layer < max(table):
        return interpolate(table, exit_layer, "hit_rate_by_exit_layer"), "interpolated"
    depth = {round(k * profile.num_layers, 9): v for k, v in ASSUMED_AGREEMENT_BY_DEPTH.items()}
    return interpolate(depth, exit_layer, "assumed agreement"), "ASSUMED"


# --- choosing (ℓe, κ, γ, B) ---------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The chosen speculation values and the latency model's predictions for them (seconds)."""

    exit_layer: int
    exit_top_k: int
    num_draft_tokens: int
    branch_budget: int
    num_branches: int  # branches that exist for (γ, κ); the budget rolls out min(B, this)
    accept_rate: float
    agreement: float  # exit-head top-1 agreement at ℓe
    agreement_source: str  # "measured" | "interpolated" | "ASSUMED"
    hit_rate: float
    expected_tokens: float
    t_block: float  # t_T(γ+1)
    t_exit_head: float
    t_pre: float
    t_suf: float
    t_rollout: float  # γ·t_d(B)
    t_exposed: float  # max(0, t_chan + (γ·t_d(B) − t_suf)·f)
    overlap_slowdown: float  # f: suffix and rollouts stretch by this while they overlap
    t_round_mirror: float
    t_round_vanilla: float
    t_round_autoregressive: float  # t_T(1): one token per round
    speedup_mirror: float
    speedup_vanilla: float
    speedup_autoregressive: float
    draft_hidden: bool  # γ·t_d(B) <= t_suf
    candidates: int  # combinations evaluated
    assumptions: tuple[str, ...]
    spec: SpecConfig  # the input SpecConfig with the chosen values filled in
    # speculative rounds from the draft-free retrieval source alone (Profile.retrieval_rounds)
    speedup_retrieval: float = 0.0  # 0.0: not measured, not a candidate
    retrieval_source: str = ""

    @property
    def best_candidate(self) -> str:
        """The highest predicted speedup: "mirror", "speculative", "retrieval" (speculative
        rounds proposed by `retrieval_source` alone, the draft idle) or "autoregressive";
        ties go to speculative, then mirror, then autoregressive, retrieval last."""
        best = max(
            (self.speedup_mirror, 2, "mirror"),
            (self.speedup_vanilla, 3, "speculative"),
            (self.speedup_retrieval, 0, "retrieval"),
            (self.speedup_autoregressive, 1, "autoregressive"),
        )
        return best[2]

    @property
    def best_mode(self) -> str:
        """The SpecConfig mode of `best_candidate` (retrieval rounds are speculative rounds)."""
        best = self.best_candidate
        return "speculative" if best == "retrieval" else best

    def _retrieval_text(self) -> str:
        return (
            f", {self.retrieval_source} alone (draft idle) {self.speedup_retrieval:.2f}x"
            if self.retrieval_source
            else ""
        )

    def mode_verdict(self) -> str:
        """One line: why `mode: auto` picks `best_mode` (the predicted speedups and f)."""
        return (
            f"mode auto chose the highest predicted speedup over autoregressive: mirror "
            f"{self.speedup_mirror:.2f}x, speculative {self.speedup_vanilla:.2f}x"
            f"{self._retrieval_text()} (overlap slowdown f = {self.overlap_slowdown:.2f}: 1 "
            f"when the draft's device shares nothing with the target's, higher when they share "
            f"cores and memory)"
        )

    def explain(self) -> str:
        """A human-readable account of the choice with every number that led to it."""
        ms = lambda t: f"{t * 1e3:.1f} ms"  # noqa: E731
        g, b = self.num_draft_tokens, min(self.branch_budget, self.num_branches)
        hidden = "hidden" if self.draft_hidden else "NOT hidden (no candidate fit the suffix)"
        lines = [
            f"chosen: exit_layer ℓe={self.exit_layer}, exit_top_k κ={self.exit_top_k}, "
            f"num_draft_tokens γ={g}, branch_budget B={self.branch_budget} "
            f"({self.candidates} combinations evaluated)",
            f"target block t_T({g + 1}) = {ms(self.t_block)}: prefix {ms(self.t_pre)}, "
            f"suffix {ms(self.t_suf)}; exit head {ms(self.t_exit_head)}",
            f"draft rollouts γ·t_d({b}) = {ms(self.t_rollout)} vs suffix {ms(self.t_suf)}: "
            f"{hidden}; exposed {ms(self.t_exposed)}",
            f"overlap slowdown f = {self.overlap_slowdown:.2f} (suffix and rollouts, measured "
            "while both pipelines run; 1 = devices that share nothing)",
            f"hit rate h = {self.hit_rate:.3f} ({b} of {self.num_branches} branches, exit "
            f"agreement {self.agreement:.2f} {self.agreement_source}); α = {self.accept_rate:.2f} -> "
            f"E[L] = {self.expected_tokens:.2f} tokens/round",
            f"round: mirror {ms(self.t_round_mirror)}, vanilla {ms(self.t_round_vanilla)}, "
            f"autoregressive {ms(self.t_round_autoregressive)} (1 token)",
            f"speedup over autoregressive: mirror {self.speedup_mirror:.2f}x, vanilla "
            f"{self.speedup_vanilla:.2f}x{self._retrieval_text()}, autoregressive 1.00x -> "
            f"best mode: {self.best_mode}"
            + (f" ({self.retrieval_source} alone)" if self.best_candidate == "retrieval" else ""),
        ]
        lines += [f"assumption: {a}" for a in self.assumptions]
        return "\n".join(lines)


def choose(
    profile: Profile,
    spec: SpecConfig | None = None,
    exit_layers: tuple[int, ...] | None = None,
    top_ks: tuple[int, ...] | None = None,
    gammas: tuple[int, ...] | None = None,
    budgets: tuple[int, ...] | None = None,
    prefer_hidden: bool = True,
) -> Choice:
    """Pick (ℓe, κ, γ, B) maximizing the predicted mirror speedup.

    Candidates per axis:
      - ℓe, B: an integer in `spec` is respected; for "auto" the given tuple, else ℓe over
        the measured layers' span (all of 1..N−1 when nothing is measured) and B over
        1..min(branch count, largest measured t_d).
      - γ, κ: the given tuple (pass `gammas=GAMMA_RANGE` / `top_ks=TOP_K_RANGE` to search),
        else the value in `spec` (GAMMA_RANGE / TOP_K_RANGE if it is ever "auto").
    With `prefer_hidden`, only combinations with γ·t_d(B) <= t_suf compete when any exists
    (docs/algorithm.md's regime; it may cost predicted speedup). Ties go to the smaller B, γ, κ,
    then the larger ℓe, so the result is deterministic.

    Returns:
        The `Choice` (chosen values, predictions, assumptions, `spec` with them filled in).
    Raises:
        ValueError: a fixed or given value needs a timing the profile lacks, or no candidates.
    """
    spec = spec or SpecConfig()
    alpha = profile.accept_rate if profile.accept_rate is not None else DEFAULT_ACCEPT_RATE
    measured_gammas = tuple(g for g in GAMMA_RANGE if g + 1 <= max(profile.t_target))
    gs = _axis(gammas, spec.num_draft_tokens, measured_gammas)
    ks = _axis(top_ks, spec.exit_top_k, TOP_K_RANGE)
    cands = []
    for layer, kappa, gamma in itertools.product(_layers(profile, spec, exit_layers), ks, gs):
        nb = num_branches(gamma, kappa)
        default_b = tuple(range(1, min(nb, max(profile.t_draft)) + 1))
        for budget in _axis(budgets, spec.branch_budget, default_b, fixed_wins=True):
            cands.append(_evaluate(profile, alpha, layer, kappa, gamma, budget))
    if not cands:
        raise ValueError("choose(): no candidate (ℓe, κ, γ, B) to evaluate")
    pool = [c for c in cands if c.draft_hidden or not prefer_hidden] or cands
    best = max(
        pool,
        key=lambda c: (
            c.speedup_mirror, -c.branch_budget, -c.num_draft_tokens, -c.exit_top_k, c.exit_layer,
        ),
    )  # fmt: skip
    chosen = replace(
        spec,
        exit_layer=best.exit_layer,
        exit_top_k=best.exit_top_k,
        num_draft_tokens=best.num_draft_tokens,
        branch_budget=best.branch_budget,
    )
    # retrieval alone is a candidate where the spec has no source of its own and a draft
    alone = spec.retrieval == "none" and spec.model_draft and profile.retrieval_rounds
    return replace(
        best, candidates=len(cands), assumptions=_assumptions(profile, best), spec=chosen,
        speedup_retrieval=profile.retrieval_speedup() if alone else 0.0,
        retrieval_source=profile.retrieval_source if alone else "",
    )  # fmt: skip


def num_branches(gamma: int, kappa: int) -> int:
    """Branches per round: κ−1 at each depth j < γ (one candidate is the draft's token), κ at γ."""
    return gamma * (kappa - 1) + kappa


def _axis(given, spec_value, default: tuple[int, ...], fixed_wins: bool = False):
    """Candidates for one axis: a fixed spec int (when it wins), else `given`, else `default`."""
    if isinstance(spec_value, int) and (fixed_wins or given is None):
        return (spec_value,)
    return tuple(given) if given is not None else default


def _layers(profile: Profile, spec: SpecConfig, given) -> tuple[int, ...]:
    if isinstance(spec.exit_layer, int):
        return (spec.exit_layer,)
    if given is not None:
        return tuple(given)
    table = profile.hit_rate_by_exit_layer
    if table:
        return tuple(range(min(table), max(table) + 1))
    return tuple(range(1, profile.num_layers))


def _evaluate(
    profile: Profile, alpha: float, layer: int, kappa: int, gamma: int, budget: int
) -> Choice:
    """The predictions for one combination (candidates, assumptions and spec filled later)."""
    n, t_t, nb = profile.num_layers, profile.target(gamma + 1), num_branches(gamma, kappa)
    t_pre, t_suf = prefix_time(t_t, layer, n), suffix_time(t_t, layer, n)
    # t_d1: per drafted token of a chain (streamed where stream rows pay)
    t_d1, t_db = profile.chain(gamma) / gamma, profile.draft(min(budget, nb))
    agreement, source = exit_agreement(profile, layer)
    h = hit_rate(alpha, gamma, kappa, budget, agreement)
    tokens, t_ar = expected_tokens(alpha, gamma), profile.target(1)
    # the exit head runs on the target device between prefix and suffix: part of its block
    f = profile.overlap_slowdown
    t_mirror = mirror_round_time(
        t_t + profile.t_exit_head, t_suf, t_db, t_d1, gamma, h, profile.t_sync, profile.t_chan, f
    )
    t_vanilla = vanilla_round_time(t_t, t_d1, gamma)
    return Choice(
        exit_layer=layer, exit_top_k=kappa, num_draft_tokens=gamma, branch_budget=budget,
        num_branches=nb, accept_rate=alpha, agreement=agreement, agreement_source=source,
        hit_rate=h, expected_tokens=tokens, t_block=t_t, t_exit_head=profile.t_exit_head,
        t_pre=t_pre, t_suf=t_suf, t_rollout=gamma * t_db,
        t_exposed=max(0.0, profile.t_chan + (gamma * t_db - t_suf) * f), overlap_slowdown=f,
        t_round_mirror=t_mirror, t_round_vanilla=t_vanilla, t_round_autoregressive=t_ar,
        speedup_mirror=speedup(tokens, t_ar, t_mirror),
        speedup_vanilla=speedup(tokens, t_ar, t_vanilla), speedup_autoregressive=1.0,
        draft_hidden=gamma * t_db <= t_suf, candidates=1, assumptions=(), spec=SpecConfig(),
    )  # fmt: skip


def _assumptions(profile: Profile, c: Choice) -> tuple[str, ...]:
    out = []
    if profile.accept_rate is None:
        out.append(f"acceptance rate α = {DEFAULT_ACCEPT_RATE} (ASSUMED: the profile has none)")
    if c.agreement_source == "ASSUMED":
        out.append(
            f"exit agreement at ℓe={c.exit_layer} ASSUMED from the logit-lens depth curve "
            "ASSUMED_AGREEMENT_BY_DEPTH (the profile has no measurement there)"
        )
    elif c.agreement_source == "interpolated":
        out.append(f"exit agreement at ℓe={c.exit_layer} interpolated between measured layers")
    out.append("the correction's rank among exit candidates is geometric (branch_masses)")
    out.append("target layers cost the same: t_pre = (ℓe/N)·t_T")
    return tuple(out)
