"""The speculation settings per live batch size: what a round does when B sequences are live.

A batched round verifies B blocks in one target forward of B·(γ+1) rows and drafts them in
one packed chain (γ steps over B rows), so its cost grows with B while batched decoding alone
(`autoregressive`, B rows per forward) already amortises the weights over B tokens: on a
memory-bound device the gain of speculating shrinks as B grows, and past some B it is a loss
(measured: at B = 4 batched `ar` 11.0 tok/s beat batched speculative 10.5). So for every size
in BATCH_SIZES the policy predicts, from the profile, batched speculation at each γ ≤ the plan's
against batched `ar`:

    speedup(B, γ) = E[L](α, γ) · t_T(B) / (γ·t_d(B) + t_T(B·(γ+1)))

and keeps the plan's mode with the best γ when that beats 1, else `autoregressive`. Batch 1
keeps the plan's own choice (`cost_model.choose`, which also models mirror's overlap); larger
batches are modelled as vanilla speculation (mirror's hidden rollouts are not credited: a
conservative bound). A plan whose rounds propose with a retrieval source alone (the draft
idle, e.g. mode auto's `sam` alone) is priced by that source's measured rounds instead
(`Profile.retrieval_rounds`, r rows verified and c tokens committed each): B sequences
verify B·r rows a round, so

    speedup(B) = Σc · t_T(B) / Σ t_T(B·r)

and α and the draft's steps play no part. A size whose rows the profile did not measure
keeps the plan's choice.
The scheduler looks up the entry of the largest size <= the live count every round. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirror_sd.partition.cost_model import DEFAULT_ACCEPT_RATE, Profile, expected_tokens

BATCH_SIZES = (1, 2, 4, 8)  # live batch sizes a plan has settings for


@dataclass(frozen=True)
class BatchSetting:
    """What a round does with `batch` (or more, up to the next size) sequences live."""

    batch: int
    mode: str  # the plan's mode, or "autoregressive"
    num_draft_tokens: int  # γ for this batch size (the plan's at batch 1)
    speedup: float | None  # predicted over batched autoregressive; None: not predicted
    reason: str

    def describe(self) -> str:
        return f"B={self.batch}: {self.mode}, γ={self.num_draft_tokens} ({self.reason})"


def batch_rows(gamma: int, sizes: tuple[int, ...] = BATCH_SIZES) -> tuple[int, ...]:
    """The target row counts the policy reads beyond 1..γ+1: B and B·(γ'+1) for every
    B > 1 in `sizes` and γ' <= γ (profiling measures these; the rest is interpolated)."""
    rows = {b * (g + 1) for b in sizes if b > 1 for g in range(0, gamma + 1)}
    return tuple(sorted(n for n in rows if n > gamma + 1))


def choose_per_batch(
    profile: Profile,
    mode: str,
    gamma: int,
    sizes: tuple[int, ...] = BATCH_SIZES,
    retrieval_alone: bool = False,
) -> tuple[BatchSetting, ...]:
    """The setting for each batch size (see the module doc); `mode`, `gamma`: the plan's;
    `retrieval_alone`: its rounds propose with `profile.retrieval_source` alone."""
    out = [BatchSetting(1, mode, gamma, None, "the plan's choice")]
    if mode == "autoregressive":
        return tuple(out + [BatchSetting(b, mode, gamma, None, "the plan's mode")
                            for b in sizes if b > 1])  # fmt: skip
    if retrieval_alone:
        return tuple(out + [_retrieval_setting(profile, mode, gamma, b) for b in sizes if b > 1])
    alpha = profile.accept_rate if profile.accept_rate is not None else DEFAULT_ACCEPT_RATE
    top = max(profile.t_target)
    for b in (s for s in sizes if s > 1):
        if b * (gamma + 1) > top or b > max(profile.t_draft):
            out.append(BatchSetting(b, mode, gamma, None, f"not profiled at {b * (gamma + 1)} "
                                    "rows: the plan's choice"))  # fmt: skip
            continue
        t_ar = profile.target(b)
        best = max(
            (expected_tokens(alpha, g) * t_ar / (g * profile.draft(b) + profile.target(b * (g + 1))), g)
            for g in range(1, gamma + 1)
        )  # fmt: skip
        speed, g = best
        if speed > 1.0:
            out.append(BatchSetting(b, mode, g, round(speed, 3),
                                    f"predicted {speed:.2f}x batched autoregressive"))  # fmt: skip
        else:
            out.append(BatchSetting(b, "autoregressive", gamma, round(speed, 3),
                                    f"speculation predicted {speed:.2f}x: decode batched"))  # fmt: skip
    return tuple(out)


def _retrieval_setting(profile: Profile, mode: str, gamma: int, b: int) -> BatchSetting:
    """Batch size `b` of a plan proposing with its retrieval source alone (module doc)."""
    rounds = profile.retrieval_rounds
    if not rounds:
        return BatchSetting(
            b, mode, gamma, None, "retrieval rounds not measured: the plan's choice"
        )
    widest = b * max(r for r, _ in rounds)
    if widest > max(profile.t_target):
        return BatchSetting(
            b, mode, gamma, None, f"not profiled at {widest} rows: the plan's choice"
        )
    speed = profile.retrieval_speedup(b)
    if speed > 1.0:
        why = f"{profile.retrieval_source} alone predicted {speed:.2f}x batched autoregressive"
        return BatchSetting(b, mode, gamma, round(speed, 3), why)
    why = f"{profile.retrieval_source} alone predicted {speed:.2f}x: decode batched"
    return BatchSetting(b, "autoregressive", gamma, round(speed, 3), why)


def plan_policy(profile: Profile | None, spec, has_draft: bool) -> tuple[BatchSetting, ...]:
    """The batch policy of a plan with speculation `spec` (a `SpecConfig`) and this profile:
    () without a profile, or without a draft unless its rounds use the measured retrieval
    source alone."""
    if profile is None:
        return ()
    alone = not spec.model_draft and spec.retrieval == profile.retrieval_source != ""
    if not (has_draft or alone):
        return ()
    return choose_per_batch(profile, spec.mode, spec.num_draft_tokens, retrieval_alone=alone)


def setting_for(policy: tuple[BatchSetting, ...], live: int) -> BatchSetting | None:
    """The entry of the largest size <= `live` (None for an empty policy)."""
    fits = [s for s in policy if s.batch <= live]
    return max(fits, key=lambda s: s.batch) if fits else None
