"""`profile()`: measure the costs the partitioner needs on the actual devices.

t_T(n) of the target, t_d(b) of the draft, the exit head's time and the logit-lens
agreement of the exit head at candidate exit layers on a short calibration text that is not
Spec-Bench; and the draft's agreement with the target (an estimate of the per-token
acceptance α) on the target's own greedy answer to a chat question, which is what rounds
verify: a text both models merely read (code above all) overstates α, and α decides whether
speculation pays at all (docs/benchmarks.md, *mode auto on the AVX2 EPYC*).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from tqdm import tqdm

from mirror_sd import progress
from mirror_sd.devices.base import ModelRunner, SplitRunner, set_threads
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.model import CausalLM
from mirror_sd.partition.cost_model import Profile
from mirror_sd.partition.spec_config import SpecConfig
from mirror_sd.partition.threads import ThreadBudget
from mirror_sd.partition.tree_shape import MAX_TREE_SIBLINGS
from mirror_sd.runtime.drafters.base import DraftSource
from mirror_sd.runtime.drafters.combine import Combined
from mirror_sd.runtime.drafters.sources import make_source

CALIBRATION_TEXT = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "The river runs past the old mill, where the children of the village gather every "
    "evening to watch the boats return with the day's catch. "
)
# α is measured on the target's greedy answer to this question (under its chat template):
# plain prose, as most chat answers are; not a Spec-Bench question
ACCEPTANCE_PROMPT = (
    "In a short paragraph, explain how a refrigerator keeps food cold, and end with one tip "
    "for using less energy."
)
ACCEPTANCE_TOKENS = 64  # tokens of the target's own answer the draft is checked against
MIN_ANSWER_TOKENS = 16  # fewer fit in the context: α is read off the calibration text instead
# the draft-free retrieval source mode auto weighs against the draft (SAM-Decoding's: on two
# shared cores a round without a draft forward can beat one with it, docs/benchmarks.md)
AUTO_RETRIEVAL = "sam"


def _median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prefill(runner: ModelRunner, context: int) -> None:
    """Empty the runner's cache and fill `context` rows (token 0) to time steps after them."""
    runner.rollback(0)
    runner.forward(torch.zeros(1, context, dtype=torch.long), torch.arange(context).unsqueeze(0),
                   causal_mask(0, context))  # fmt: skip


def time_rows(runner: ModelRunner, context: int, rows: int, reps: int) -> float:
    """Median time of one forward of `rows` new rows after `context` cached rows."""
    ids = torch.zeros(1, rows, dtype=torch.long)
    pos = torch.arange(context, context + rows).unsqueeze(0)
    mask = causal_mask(context, rows)

    _prefill(runner, context)

    def once():
        runner.rollback(context)
        runner.forward(ids, pos, mask)

    for _ in range(2):  # warm-up (first-call allocations, ORT arena growth)
        once()
    return _median_time(once, reps)


def overlap_slowdown(
    target: ModelRunner,
    draft: ModelRunner,
    context: int,
    rows: int,
    draft_rows: int,
    reps: int,
    budget: ThreadBudget | None = None,
) -> float:
    """How much longer a target forward of `rows` takes while the draft steps over
    `draft_rows` rows in a loop on another thread (>= 1; both runners are left empty).
    With a thread `budget`, alone is timed at the target's solo threads and the overlap at
    the budget's overlap threads (as mirror rounds run them).

    Two devices that share nothing give ~1. Two "devices" on one CPU package share its memory
    bus and caches: a mirror round's suffix and rollouts then slow each other down, which
    the cost model must know to compare mirror with vanilla speculative decoding honestly.
    """
    alone = time_rows(target, context, rows, reps)
    ids = torch.zeros(1, draft_rows, dtype=torch.long)
    pos = torch.arange(context, context + draft_rows).unsqueeze(0)
    mask = causal_mask(context, draft_rows)
    _prefill(draft, context)
    stop, started = threading.Event(), threading.Event()

    def spin() -> None:
        while not stop.is_set():
            draft.rollback(context)
            draft.forward(ids, pos, mask)
            started.set()

    if budget is not None:
        set_threads(target, budget.target(overlapped=True))
        set_threads(draft, budget.draft(overlapped=True))
    worker = threading.Thread(target=spin, name="overlap-probe", daemon=True)
    worker.start()
    try:
        started.wait(timeout=60)
        busy = time_rows(target, context, rows, reps)
    finally:
        stop.set()
        worker.join()
        draft.rollback(0)
        if budget is not None:
            set_threads(target, budget.target())
            set_threads(draft, budget.draft())
    return max(1.0, busy / alone)


@torch.inference_mode()
def agreement_by_layer(
    model: CausalLM, ids: Sequence[int], layers: Sequence[int]
) -> dict[int, float]:
    """Top-1 agreement of the exit head (final norm + LM head) at each ℓe with the final layer,
    teacher-forced over `ids` (the logit lens)."""
    cache = model.new_cache(len(ids))
    t = torch.tensor([list(ids)], device=model.model.embed_tokens.weight.device)
    pos = torch.arange(len(ids), device=t.device).unsqueeze(0)
    mask = causal_mask(0, len(ids)).to(t.device)
    x, early = model.embed(t), {}
    for i in range(model.num_layers):
        x = model.run_layers(i, i + 1, x, pos, mask, cache)
        if i + 1 in layers:
            early[i + 1] = model.head(x)[0].argmax(-1)
    final = model.head(x)[0].argmax(-1)
    return {layer: float((early[layer] == final).float().mean()) for layer in sorted(early)}


def teacher_forced_agreement(target: ModelRunner, draft: ModelRunner, ids: Sequence[int]) -> float:
    """Fraction of positions where the draft's argmax equals the target's (an α estimate)."""
    return teacher_forced(target, draft, ids)[0]


def teacher_forced(
    target: ModelRunner,
    draft: ModelRunner,
    ids: Sequence[int],
    siblings: int = 0,
    first: int = 0,
) -> tuple[float, tuple[float, ...]]:
    """(α, β_1..β_siblings) on the positions `first`.. of `ids`, both models fed the same
    tokens (`first` > 0: a prompt's positions are read, not counted).

    α: the fraction of positions where the draft's argmax is the target's. β_s: among the
    positions where it is not, the fraction where the target's argmax is one of the draft's
    next s best tokens (`Profile.sibling_coverage`; 0 when the draft always agrees)."""
    n = len(ids)
    if not 0 <= first < n:
        raise ValueError(f"teacher_forced: first={first} must lie in [0, {n}) (len(ids))")
    t, pos, mask = torch.tensor([list(ids)]), torch.arange(n).unsqueeze(0), causal_mask(0, n)
    target.rollback(0)
    draft.rollback(0)
    a = target.forward(t, pos, mask).argmax(-1).reshape(-1)  # (n,)
    d = draft.forward(t, pos, mask)
    d = d.reshape(-1, d.shape[-1])  # (n, V)
    target.rollback(0)
    draft.rollback(0)
    ranked = d[first:].topk(1 + siblings, dim=-1).indices  # (n - first, 1 + s)
    hit = ranked == a[first:, None]
    missed = ~hit[:, 0]
    misses = int(missed.sum())
    coverage = tuple(
        float(hit[missed, 1 : 1 + s].any(-1).sum()) / misses if misses else 0.0
        for s in range(1, siblings + 1)
    )
    return float(hit[:, 0].float().mean()), coverage


@torch.inference_mode()
def greedy_answer(target: ModelRunner, prompt_ids: Sequence[int], n: int) -> list[int]:
    """The target's own greedy continuation of `prompt_ids`, `n` tokens at most (fewer when
    the runner's context ends first), decoded one row at a time; the runner is left empty."""
    n = min(n, target.max_len - len(prompt_ids))
    if n < 1 or not prompt_ids:
        raise ValueError(
            f"greedy_answer: a {len(prompt_ids)}-token prompt leaves no room in the target's "
            f"{target.max_len}-token context"
        )
    target.rollback(0)
    ids, out = list(prompt_ids), []
    logits = target.forward(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0),
                            causal_mask(0, len(ids)))  # fmt: skip
    for _ in range(n):
        out.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
        p = len(ids) + len(out) - 1
        if len(out) < n:
            logits = target.forward(torch.tensor([[out[-1]]]), torch.tensor([[p]]),
                                    causal_mask(p, 1))  # fmt: skip
    target.rollback(0)
    return out


def answer_agreement(
    target: ModelRunner,
    draft: ModelRunner,
    prompt_ids: Sequence[int],
    siblings: int = 0,
    n: int = ACCEPTANCE_TOKENS,
    answer: Sequence[int] | None = None,
) -> tuple[float, tuple[float, ...]]:
    """`teacher_forced` over the target's own greedy answer to `prompt_ids` (`greedy_answer`,
    or `answer` when given), counting the positions that predict the answer's tokens: the
    agreement greedy rounds see, since each round verifies a continuation the target would
    write itself."""
    if answer is None:
        answer = greedy_answer(target, prompt_ids, min(n, draft.max_len - len(prompt_ids)))
    ids = [*prompt_ids, *answer[:-1]]  # the last answer token predicts nothing checked
    return teacher_forced(target, draft, ids, siblings, first=len(prompt_ids) - 1)


def retrieval_rounds(
    source: DraftSource,
    prompt_ids: Sequence[int],
    answer: Sequence[int],
    gamma: int,
    min_match: int,
) -> tuple[tuple[int, int], ...]:
    """(rows verified, tokens committed) of each greedy round `source` makes alone over
    `answer`, as the scheduler runs it (`Combined` with no fallback: a proposal counts when
    its match is at least `min_match` long, at most γ tokens; no proposal is a one-row step).
    Greedy rounds commit the proposal's agreeing prefix and the target's next token, so
    this replays exactly what generating `answer` would verify."""
    gate = Combined(source, None, threshold=min_match)
    gate.reset(prompt_ids)
    rounds, i = [], 0
    while i < len(answer):
        proposal = gate.propose(gamma).tokens
        k = 0
        while k < len(proposal) and i + k < len(answer) and proposal[k] == answer[i + k]:
            k += 1
        n = min(k + 1, len(answer) - i)
        rounds.append((len(proposal) + 1, n))
        gate.extend(answer[i : i + n])
        i += n
    return tuple(rounds)


def auto_retrieval(spec: SpecConfig) -> tuple[str, DraftSource, int] | None:
    """`profile()`'s `retrieval` for `spec`: AUTO_RETRIEVAL, a fresh source and the spec's
    minimum match, when the mode is auto and the map names no retrieval source of its own
    (and runs its draft); None otherwise."""
    if spec.mode != "auto" or spec.retrieval != "none" or not spec.model_draft:
        return None
    return (
        AUTO_RETRIEVAL,
        make_source(AUTO_RETRIEVAL, spec.retrieval_max_ngram),
        spec.retrieval_min_match,
    )


def lens_layers(n_layers: int) -> range:
    """The ℓe candidates whose logit-lens agreement a profile measures: [N/4, N)."""
    return range(max(1, n_layers // 4), n_layers)


def profile(
    target: SplitRunner,
    draft: ModelRunner,
    lens_model: CausalLM | Mapping[int, float],
    calibration_ids: Sequence[int],
    max_block: int = 9,
    draft_rows: Sequence[int] = (1, 2, 4, 8, 16),
    context: int = 128,
    reps: int = 3,
    candidate_layers: Sequence[int] | None = None,
    description: str = "",
    budget: ThreadBudget | None = None,
    extra_rows: Sequence[int] = (),
    acceptance_ids: Sequence[int] | None = None,
    retrieval: tuple[str, DraftSource, int] | None = None,
) -> Profile:
    """Measure a `Profile` on the runners' real devices (each runner is left empty), each
    runner at its solo threads of `budget`, the overlap slowdown at the overlap threads.

    `lens_model` is the target as a torch `CausalLM` (any device), used for the exit head's
    logit-lens agreement per candidate exit layer, or that agreement already measured
    (`agreement_by_layer` over `lens_layers`): compile() measures it first and frees the
    torch model before the ONNX Runtime sessions load. `extra_rows`: target row counts
    beyond 1..max_block to time (the batch policy's, `partition.batch_policy.batch_rows`).
    `acceptance_ids`: a prompt (ACCEPTANCE_PROMPT under the chat template) whose greedy answer
    by the target measures α and sibling coverage (`answer_agreement`); None: they are read
    off `calibration_ids` teacher-forced. `retrieval`: (name, a fresh source, min match) to
    replay over that answer (`retrieval_rounds`, γ = max_block − 1), a candidate of mode auto;
    it needs `acceptance_ids`. A context too short for the prompt and MIN_ANSWER_TOKENS of
    answer falls back to the calibration text (no retrieval rounds). A bar on stderr counts
    the measurements when progress is shown (`mirror_sd.progress`).
    """
    lens = lens_model if isinstance(lens_model, Mapping) else None
    n_layers = target.n_layers if lens is not None else lens_model.num_layers
    if budget is not None:
        set_threads(target, budget.target())
        set_threads(draft, budget.draft())
    rows = sorted(
        set(range(1, max_block + 1)) | {n for n in extra_rows if n <= target.max_len // 2}
    )
    context = min(context, target.max_len - max(rows), draft.max_len - max(draft_rows))
    # a tick per timed shape, then the exit head, the overlap probe and the agreements
    with progress.bar(len(rows) + len(draft_rows) + 3, desc="profiling", unit="step") as bar:
        t_target = _time_each(target, context, rows, reps, bar)
        t_draft = _time_each(draft, context, draft_rows, reps, bar)
        target.rollback(0)
        draft.rollback(0)
        if lens is None:
            dtype = lens_model.model.embed_tokens.weight.dtype
            width = lens_model.config.hidden_size
        else:
            dtype, width = torch.float32, target.hidden_size
        hidden = torch.zeros(1, max_block, width, dtype=dtype)
        t_exit = _median_time(lambda: target.exit_logits(hidden), reps)
        bar.update()
        layers = candidate_layers or lens_layers(n_layers)
        slowdown = overlap_slowdown(
            target, draft, context, max_block, min(4, max(draft_rows)), reps, budget
        )
        target.rollback(0)
        bar.update()
        rounds, source_name = (), ""
        room = min(target.max_len, draft.max_len) - len(acceptance_ids or ())
        if acceptance_ids is None or room < MIN_ANSWER_TOKENS:
            accept, coverage = teacher_forced(target, draft, calibration_ids, MAX_TREE_SIBLINGS)
        else:
            answer = greedy_answer(target, acceptance_ids, min(ACCEPTANCE_TOKENS, room))
            accept, coverage = answer_agreement(
                target, draft, acceptance_ids, MAX_TREE_SIBLINGS, answer=answer
            )
            if retrieval is not None:
                source_name, source, min_match = retrieval
                rounds = retrieval_rounds(source, acceptance_ids, answer, max_block - 1, min_match)
        hit_rates = (
            {k: v for k, v in lens.items() if k in layers}
            if lens is not None
            else agreement_by_layer(lens_model, calibration_ids, list(layers))
        )
        bar.update()
    return Profile(
        num_layers=n_layers,
        t_target=t_target,
        t_draft=t_draft,
        t_exit_head=t_exit,
        accept_rate=accept,
        hit_rate_by_exit_layer=hit_rates,
        description=description,
        overlap_slowdown=round(slowdown, 3),
        sibling_coverage=coverage,
        retrieval_source=source_name,
        retrieval_rounds=rounds,
    )


def _time_each(runner: ModelRunner, context: int, sizes: Sequence[int], reps: int,
               bar: tqdm) -> dict[int, float]:  # fmt: skip
    """{rows: `time_rows(runner, context, rows, reps)`} for each size, a tick of `bar` each."""
    times = {}
    for n in sizes:
        times[n] = time_rows(runner, context, n, reps)
        bar.update()
    return times
