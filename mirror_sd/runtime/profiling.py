"""`profile()`: measure the costs the partitioner needs on the actual devices.

t_T(n) of the target, t_d(b) of the draft, the exit head's time, the logit-lens
agreement of the exit head at candidate exit layers, and the draft's teacher-forced
agreement with the target (an estimate of the per-token acceptance α), all on a short
calibration text that is not Spec-Bench.
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
from mirror_sd.partition.threads import ThreadBudget
from mirror_sd.partition.tree_shape import MAX_TREE_SIBLINGS

CALIBRATION_TEXT = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "The river runs past the old mill, where the children of the village gather every "
    "evening to watch the boats return with the day's catch. "
)


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
    target: ModelRunner, draft: ModelRunner, ids: Sequence[int], siblings: int = 0
) -> tuple[float, tuple[float, ...]]:
    """(α, β_1..β_siblings) on the positions of `ids`, both models fed the same tokens.

    α: the fraction of positions where the draft's argmax is the target's. β_s: among the
    positions where it is not, the fraction where the target's argmax is one of the draft's
    next s best tokens (`Profile.sibling_coverage`; 0 when the draft always agrees)."""
    n = len(ids)
    t, pos, mask = torch.tensor([list(ids)]), torch.arange(n).unsqueeze(0), causal_mask(0, n)
    target.rollback(0)
    draft.rollback(0)
    a = target.forward(t, pos, mask).argmax(-1).reshape(-1)  # (n,)
    d = draft.forward(t, pos, mask)
    d = d.reshape(-1, d.shape[-1])  # (n, V)
    target.rollback(0)
    draft.rollback(0)
    ranked = d.topk(1 + siblings, dim=-1).indices  # (n, 1 + s)
    hit = ranked == a[:, None]
    missed = ~hit[:, 0]
    misses = int(missed.sum())
    coverage = tuple(
        float(hit[missed, 1 : 1 + s].any(-1).sum()) / misses if misses else 0.0
        for s in range(1, siblings + 1)
    )
    return float(hit[:, 0].float().mean()), coverage


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
) -> Profile:
    """Measure a `Profile` on the runners' real devices (each runner is left empty), each
    runner at its solo threads of `budget`, the overlap slowdown at the overlap threads.

    `lens_model` is the target as a torch `CausalLM` (any device), used for the exit head's
    logit-lens agreement per candidate exit layer, or that agreement already measured
    (`agreement_by_layer` over `lens_layers`): compile() measures it first and frees the
    torch model before the ONNX Runtime sessions load. `extra_rows`: target row counts
    beyond 1..max_block to time (the batch policy's, `partition.batch_policy.batch_rows`).
    A bar on stderr counts the measurements when progress is shown (`mirror_sd.progress`).
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
        accept, coverage = teacher_forced(target, draft, calibration_ids, MAX_TREE_SIBLINGS)
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
    )


def _time_each(runner: ModelRunner, context: int, sizes: Sequence[int], reps: int,
               bar: tqdm) -> dict[int, float]:  # fmt: skip
    """{rows: `time_rows(runner, context, rows, reps)`} for each size, a tick of `bar` each."""
    times = {}
    for n in sizes:
        times[n] = time_rows(runner, context, n, reps)
        bar.update()
    return times
