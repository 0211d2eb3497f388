"""Cost model: measured timings (`Profile`), the Mirror-SD latency model, and `choose()`.

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
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from mirror_sd.partition.spec_config import SpecConfig

PROFILE_VERSION = 1
GAMMA_RANGE = tuple(range(1, 9))  # γ searched when the caller asks (or SpecConfig says "auto")
TOP_K_RANGE = (1, 2, 4, 8)  # κ searched likewise
# ASSUMED α when a profile has no measured acceptance rate.
DEFAULT_ACCEPT_RATE = 0.6
# ASSUMED exit-head top-1 agreement with the target's token vs depth fraction ℓe/N, used when
# a profile has no measurement: the shape the logit-lens literature reports for an untrained
# exit head (final norm + LM head applied early): near zero in the first quarter, rising
# steeply over the last third. docs/training.md has measurements for trained heads.
ASSUMED_AGREEMENT_BY_DEPTH = {0.0: 0.0, 0.25: 0.10, 0.5: 0.30, 0.75: 0.60, 1.0: 1.0}


@dataclass(frozen=True)
class Profile:
    """Measured timings of one (target device, draft device) pair; seconds throughout.

    Attributes:
        num_layers: N, the target's layer count.
        t_target: n -> full target forward on n new rows (n = 1..16; must include 1).
        t_draft: b -> one draft step over b branch rows (must include 1).
        t_exit_head: the exit head on γ+1 rows (target device).
        t_chan: token channel latency, target -> draft device.
        t_sync: rendezvous overhead per round (verdict -> branch lookup -> next round).
        accept_rate: measured per-token acceptance α in [0, 1], or None (then ASSUMED).
        overlap_slowdown: f >= 1, how much longer target and draft steps take while both
            pipelines run at once (1 for devices with their own cores and memory; on one CPU
            package both share the memory bus). Stretches the overlapped suffix and rollouts.
        hit_rate_by_exit_layer: ℓe -> measured probability that the exit head's top-1 token
            at ℓe equals the target's token (logit-lens agreement); the rank model below turns
            it into top-κ coverage. Empty: `ASSUMED_AGREEMENT_BY_DEPTH` is used.
        description: free text (machine, models, dtype).
        stream_accuracy: the draft's stream rows (speculative streaming): held-out accuracy of
            stream j's guess of the draft's own token, j = 1..k; empty: no stream rows. The
            chain then costs `chain(γ)` (the cheaper of streamed and one token per step).
        sibling_coverage: β_s for s = 1, 2, ...: the probability that the target's token is
            among the draft's next s best tokens when it is not the draft's first choice
            (teacher-forced on the calibration text); empty: not measured. Sizes a
            speculative round's token tree (`partition.tree_shape`).
        retrieval_source: the draft-free retrieval source `retrieval_rounds` ran ("" none).
        retrieval_rounds: (rows verified, tokens committed) of each greedy round that source
            makes alone (the draft idle) over the target's own answer to the acceptance
            prompt: its speedup is predicted from these rounds and t_T, not from α
            (`retrieval_speedup`); empty: not measured, not a candidate of mode auto.
    """

    num_layers: int
    t_target: dict[int, float]
    t_draft: dict[int, float]
    t_exit_head: float = 0.0
    t_chan: float = 0.0
    t_sync: float = 0.0
    accept_rate: float | None = None
    hit_rate_by_exit_layer: dict[int, float] = field(default_factory=dict)
    description: str = ""
    overlap_slowdown: float = 1.0
    stream_accuracy: tuple[float, ...] = ()
    sibling_coverage: tuple[float, ...] = ()
    retrieval_source: str = ""
    retrieval_rounds: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or self.num_layers < 2:
            raise ValueError(f"profile num_layers must be an integer >= 2, got {self.num_layers!r}")
        for name in ("t_target", "t_draft"):
            table = getattr(self, name)
            if 1 not in table or any(k < 1 or v <= 0 for k, v in table.items()):
                raise ValueError(f"profile {name} needs positive times for n >= 1, n = 1 included")
        if self.overlap_slowdown < 1:
            raise ValueError(f"profile overlap_slowdown must be >= 1, got {self.overlap_slowdown}")
        for name in ("t_exit_head", "t_chan", "t_sync"):
            if getattr(self, name) < 0:
                raise ValueError(f"profile {name} must be >= 0, got {getattr(self, name)}")
        if self.accept_rate is not None and not 0 <= self.accept_rate <= 1:
            raise ValueError(f"profile accept_rate must be in [0, 1], got {self.accept_rate}")
        cov = self.sibling_coverage
        if any(not 0 <= c <= 1 for c in cov) or any(a > b for a, b in itertools.pairwise(cov)):
            raise ValueError(
                f"profile sibling_coverage must be non-decreasing values in [0, 1], got {cov}"
            )
        if any(not 1 <= tokens <= rows for rows, tokens in self.retrieval_rounds):
            raise ValueError(
                "profile retrieval_rounds must be (rows, tokens) pairs with 1 <= tokens <= rows"
            )
        for layer, rate in self.hit_rate_by_exit_layer.items():
            if not 1 <= layer < self.num_layers or not 0 <= rate <= 1:
                raise ValueError(
                    f"profile hit_rate_by_exit_layer[{layer}] = {rate}: need 1 <= layer <= "
                    f"{self.num_layers - 1} and a rate in [0, 1]"
                )

    def target(self, n: int) -> float:
        """t_T(n), linearly interpolated between measured n. Raises ValueError outside them."""
        return _interp(self.t_target, n, "t_target")

    def draft(self, b: int) -> float:
        """t_d(b), linearly interpolated between measured b. Raises ValueError outside them."""
        return _interp(self.t_draft, b, "t_draft")

    def chain(self, gamma: int) -> float:
        """Expected time of the draft's chain of γ tokens: γ one-row steps, or, with stream
        rows, the streamed chain when it is predicted cheaper (`streams_pay`)."""
        plain = gamma * self.draft(1)
        if not self.stream_accuracy:
            return plain
        return min(plain, streamed_chain_time(gamma, self.stream_accuracy, self.draft))

    def streams_pay(self, gamma: int) -> bool:
        """Does the streamed chain beat γ one-row steps at this γ (by the measured t_d(rows))?"""
        return bool(self.stream_accuracy) and streamed_chain_time(
            gamma, self.stream_accuracy, self.draft
        ) < gamma * self.draft(1)

    def retrieval_speedup(self) -> float:
        """Predicted speedup over autoregressive of `retrieval_rounds`: their tokens at t_T(1)
        each over their blocks' t_T(rows); 0.0 when not measured."""
        if not self.retrieval_rounds:
            return 0.0
        tokens = sum(n for _, n in self.retrieval_rounds)
        return tokens * self.target(1) / sum(self.target(r) for r, _ in self.retrieval_rounds)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (table keys become strings)."""
        d = asdict(self)
        for name in ("t_target", "t_draft", "hit_rate_by_exit_layer"):
            d[name] = {str(k): v for k, v in sorted(d[name].items())}
        return {"version": PROFILE_VERSION, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Inverse of `to_dict`. Raises ValueError on a wrong version or unknown keys."""
        data = dict(data)
        if data.pop("version", None) != PROFILE_VERSION:
            raise ValueError(f"profile: expected `version: {PROFILE_VERSION}`")
        valid = set(cls.__dataclass_fields__)
        if set(data) - valid:
            raise ValueError(
                f"profile: unknown keys {sorted(set(data) - valid)}; valid: {sorted(valid)}"
            )
        for name in ("t_target", "t_draft", "hit_rate_by_exit_layer"):
            data[name] = {int(k): float(v) for k, v in data.get(name, {}).items()}
        for name in ("stream_accuracy", "sibling_coverage"):
            data[name] = tuple(float(a) for a in data.get(name, ()))
        data["retrieval_rounds"] = tuple(
            (int(r), int(n)) for r, n in data.get("retrieval_rounds", ())
        )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile JSON file. Raises ValueError naming the file when it is malformed."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


def _interp(table: dict[int, float], x: float, name: str) -> float:
    if x in table:
        return table[x]
    keys = sorted(table)
    if not keys[0] <= x <= keys[-1]:
        raise ValueError(f"profile {name} covers {keys[0]}..{keys[-1]}; {x} needs a measurement")
    hi = next(k for k in keys if k > x)
    lo = max(k for k in keys if k < x)
    return table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)


# --- the latency model (docs/algorithm.md), one formula per function ---------------------------


def prefix_time(t_block: float, exit_layer: int, num_layers: int) -> float:
    """t_pre ≈ (ℓe/N)·t_T: layers [0, ℓe) of a uniform-layer target."""
    return exit_layer / num_layers * t_block


def suffix_time(t_block: float, exit_layer: int, num_layers: int) -> float:
    """t_suf = t_T − t_pre: layers [ℓe, N), final norm and LM head."""
    return t_block - prefix_time(t_block, exit_layer, num_layers)


def streamed_chain_time(gamma: int, accuracy: Sequence[float],
                        t_draft: Callable[[int], float]) -> float:  # fmt: skip
    """Expected time of a streamed chain of γ tokens (docs/algorithm.md, *Multi-token
    drafts*): each forward runs 1 + g + s rows (the picked token, g guesses worth checking, s
    fresh streams) and yields 1 + m tokens, m = the guesses that held in a row; guess i holds
    with probability accuracy[i - 1] once guesses 1..i-1 held (the held-out per-stream
    accuracy, taken as that conditional: optimistic when errors cluster). Fresh guesses exist
    only after every checked guess held. `t_draft(rows)`: one draft forward."""
    k = len(accuracy)

    @cache
    def expect(left: int, g: int) -> float:
        if left <= 0:
            return 0.0
        g = min(g, left - 1)
        s = min(k, left - 1 - g)
        total, p_run = t_draft(1 + g + s), 1.0
        for m in range(g + 1):  # m guesses held, then a miss (or no guess left)
            p = p_run * (1 - accuracy[m]) if m < g else p_run
            nxt = s if m == g else 0
            total += p * expect(left - 1 - m, nxt)
            if m < g:
                p_run *= accuracy[m]
        return total

    return expect(gamma, 0)


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
        return _interp(table, exit_layer, "hit_rate_by_exit_layer"), "interpolated"
    depth = {round(k * profile.num_layers, 9): v for k, v in ASSUMED_AGREEMENT_BY_DEPTH.items()}
    return _interp(depth, exit_layer, "assumed agreement"), "ASSUMED"


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
