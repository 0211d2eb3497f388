"""`Plan`: a compiled dual-device plan that generates text.

It owns the two runners (target on device A, draft on device B), one pipeline per device
and the tokenizer; `generate()` / `stream()` run the verification scheduler in the
caller's thread (one prompt is a batch of one: `runtime/batch.py`). A plan serves one
generation at a time: a second concurrent call is rejected with `PlanBusyError` rather than
silently serialized.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mirror_sd.devices.base import ModelRunner, SplitRunner
from mirror_sd.partition.batch_policy import BatchSetting
from mirror_sd.partition.block_bounds import check_block_bounds
from mirror_sd.partition.device_map import DeviceSpec
from mirror_sd.partition.spec_config import SpecConfig
from mirror_sd.partition.threads import ThreadBudget
from mirror_sd.runtime.acceptance import Sampling
from mirror_sd.runtime.batch import BatchJob, is_batch
from mirror_sd.runtime.batch_session import BatchSession
from mirror_sd.runtime.busy import BUSY, PlanBusyError
from mirror_sd.runtime.compile_report import CompileReport
from mirror_sd.runtime.draft_engine import DraftEngine
from mirror_sd.runtime.draft_policy import DraftPolicy
from mirror_sd.runtime.drafters.sources import fork, make_source
from mirror_sd.runtime.packing import PackedCache
from mirror_sd.runtime.pipelines import Pipeline
from mirror_sd.runtime.prompts import Prompt, eos_token_ids
from mirror_sd.runtime.results import GenerationResult
from mirror_sd.runtime.scheduler import RoundSettings, SeqState, VerificationScheduler
from mirror_sd.runtime.tracing import Tracer


@dataclass(frozen=True)
class DeviceSlot:
    alias: str  # the device map's alias, e.g. "npu"
    label: str  # backend and EP, e.g. "onnxruntime CPUExecutionProvider"


class Plan:
    def __init__(
        self,
        *,
        target: SplitRunner,
        target_device: DeviceSlot,
        tokenizer,
        spec: SpecConfig,
        draft: ModelRunner | None = None,
        draft_device: DeviceSlot | None = None,
        generation_config: dict | None = None,
        device_specs: tuple[DeviceSpec, DeviceSpec | None] | None = None,
        report: CompileReport | None = None,
        accept_rate: float | None = None,
        exit_head=None,
        batch_policy: tuple[BatchSetting, ...] = (),
        draft_streams: Sequence[int] = (),
        trees: str | None = None,
        amphista=None,
    ):
        self.target, self.draft = target, draft
        self.target_device, self.draft_device = target_device, draft_device
        self.tokenizer = tokenizer
        self.spec = spec
        self.generation_config = generation_config or {}
        self.report = report  # what compile() decided and measured (describe(), save())
        self.accept_rate = accept_rate  # the measured α: the prior for ranking branches
        self.exit_head = exit_head  # graphs.heads.ExitHead, or None: the runner's own head
        self.amphista = amphista  # graphs.amphista.AmphistaHeads at ℓe, or None
        self.batch_policy = batch_policy  # mode and γ per live batch size (partition.batch_policy)
        self.device_specs = device_specs  # (target's, draft's) map entries: the thread budget
        self.draft_streams = list(draft_streams)  # input ids of the draft's stream rows
        self.no_trees = trees  # why token trees would not stay lossless here (None: they do)
        self.target_pipe = Pipeline(target_device.alias, "verification")
        self.draft_pipe = Pipeline(draft_device.alias, "draft streaming") if draft_device else None
        self._busy = threading.Lock()
        self._sources: dict[
            tuple[str, int], object
        ] = {}  # retrieval sources keep plan-level memory
        self.draft_disabled: str | None = None  # why, while a hung draft call has not returned
        # prefix caching: each runner's packed cache, kept between generations, with the
        # target's exit layer it was written under
        self._kept: dict[str, tuple[PackedCache, object]] = {}

    @property
    def auto_tree(self) -> tuple[int, ...] | None:
        """The tree shape compile() sized for speculative rounds (what a call's
        `tree_siblings="auto"` runs; `partition.tree_shape`), None when nothing was measured."""
        tree = getattr(self.report, "tree", None)
        return tree.shape if tree is not None else None

    # --- generation -----------------------------------------------------------------------
    def generate(
        self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 128, **kwargs
    ) -> GenerationResult | list[GenerationResult]:
        """Generate from text, chat messages or token ids. See `stream` for the arguments.

        A list of prompts (strings, message lists or id lists) runs as one batch, one target
        forward per round over every live sequence, and returns one result per prompt in
        order, each equal to its batch-1 result's tokens (`runtime/batch.py`; `seed` + i seeds
        prompt i; budgets, sampling settings and stop strings may be lists, one per prompt).
        Every prompt is checked before any work starts; an invalid one raises ValueError
        naming `prompts[i]`.
        """
        if is_batch(prompt):
            job = BatchJob.prepare(self, prompt, max_new_tokens, **kwargs)
            self.claim()
            try:
                return job.run()
            finally:
                self.release()
        gen = self._run(prompt, max_new_tokens, **kwargs)
        for _ in gen:
            pass
        return self._last

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, **kwargs) -> Iterator[str]:
        """Yield the text each verified round adds. Closing the iterator stops both pipelines
        after the round in flight. The full result is in `plan.last_result` afterwards.

        `prompt`: text, a list of {"role", "content"} chat messages, or a list of token ids in
        [0, the target's vocab_size); `max_new_tokens`: a positive int. Anything else raises
        ValueError naming the argument (when the first piece is asked for).

        Keyword args: temperature, top_k, top_p (defaults from SpecConfig), seed (int),
        stop_strings (list of str), eos_token_id (int or list), chat (apply the chat
        template to a string prompt, default True), trace (path for a Chrome trace JSON),
        mode and other SpecConfig fields to override for this call.
        """
        if is_batch(prompt):
            raise ValueError("stream() takes one prompt; generate([...]) runs a batch of prompts")
        prev = ""
        for _ in self._run(prompt, max_new_tokens, **kwargs):
            text = self.tokenizer.decode(self._produced, skip_special_tokens=True)
            if len(text) > len(prev) and not text.endswith("\ufffd"):
                yield text[len(prev) :]
                prev = text

    def batch_session(self, trace: str | None = None, **overrides) -> BatchSession:
        """A continuous batch on this plan (`with plan.batch_session(mode=...) as b:`): admit
        prompts, run rounds, cancel, read results; see runtime/batch_session.py. `overrides`
        are SpecConfig fields for the whole session; `trace` a Chrome trace path."""
        return BatchSession(self, trace=trace, **overrides)

    @property
    def last_result(self) -> GenerationResult | None:
        return getattr(self, "_last", None)

    def claim(self) -> None:
        """Take the plan for one generation or session; `release()` gives it back.

        Raises:
            PlanBusyError: another generation or session holds it.
        """
        if not self._busy.acquire(blocking=False):
            raise PlanBusyError(BUSY)

    def release(self) -> None:
        self._busy.release()

    def _run(self, prompt: Prompt, max_new_tokens: int, **kwargs) -> Iterator[None]:
        job = BatchJob.prepare(self, [prompt], max_new_tokens, single=True, **kwargs)
        self.claim()
        self._produced: list[int] = []
        rounds = job.rounds()
        try:
            for new in rounds:
                self._produced = job.cut(0, self._produced + new[0])
                yield None
        finally:
            rounds.close()
            if job.results:
                self._last = job.results[0]
            self.release()

    def retrieval(self, spec: SpecConfig):
        """The plan's retrieval source for these settings, or None (kept across generations:
        Hierarchy Drafting remembers this plan's recent outputs); each sequence runs a fork."""
        key = (spec.retrieval, spec.retrieval_max_ngram)
        if key not in self._sources:
            self._sources[key] = make_source(*key)
        return self._sources[key]

    def scheduler(self, spec: SpecConfig, settings: RoundSettings) -> VerificationScheduler:
        """A round loop for one generation, batch or session under `spec` (its `tracer` has
        the target's device, and the draft's when the model draft runs: unless the settings
        say autoregressive, `model_draft` is off, or a hang disabled it for this plan)."""
        tracer = Tracer()
        tracer.add_device(self.target_device.alias, self.target_device.label)
        drafts = (self.draft is not None and spec.model_draft and self.draft_disabled is None
                  and settings.mode != "autoregressive")  # fmt: skip
        if drafts:
            tracer.add_device(self.draft_device.alias, self.draft_device.label)
        if spec.exit_layer != "auto" and hasattr(self.target, "exit_layer"):
            self.target.exit_layer = int(spec.exit_layer)
        engine = None
        if drafts:
            if hasattr(self.draft, "configure"):  # S2D exits: this call's setting
                self.draft.configure(spec.draft_exits != "none", spec.draft_exit_threshold)
            streams = self.draft_streams if spec.draft_streams != "none" else ()
            engine = DraftEngine(self.draft, self.packed_cache("draft", spec), streams)
        exit_head = self.exit_head.exit_logits if self.exit_head is not None else None
        heads = self.amphista if spec.amphista != "none" else None
        return VerificationScheduler(self.target, self.target_pipe, engine, self.draft_pipe,
                                     settings, tracer, exit_head,
                                     self.packed_cache("target", spec), heads)  # fmt: skip

    def packed_cache(self, role: str, spec: SpecConfig) -> PackedCache:
        """The packed cache of the `role` ("target" | "draft") runner for a round loop under
        `spec`. With `spec.prefix_cache` the plan keeps it between generations, so retained
        prefixes (finished sequences' rows) serve later prompts; it starts afresh when its
        bookkeeping no longer matches the runner (a runner call raised) or the target's exit
        layer moved. Without, every round loop starts from an empty cache."""
        runner = self.target if role == "target" else self.draft
        layer = getattr(self.target, "exit_layer", None)
        kept = self._kept.pop(role, None)
        if spec.prefix_cache and kept is not None and kept[1] == layer and kept[0].usable():
            kept[0].leave_all()  # sequences a cancelled loop left live become retained
            cache = kept[0]
        else:
            cache = PackedCache(runner, retain=spec.prefix_cache)
        if spec.prefix_cache:
            self._kept[role] = (cache, layer)
        return cache

    def sequence(self, index: int, ids: list[int], max_new_tokens: int, sampling: Sampling,
                 seed: int, spec: SpecConfig) -> SeqState:  # fmt: skip
        """One sequence for `scheduler(spec, ...)`: its verification generator seeded with
        `seed`, its draft generator with seed + 1, its own fork of the retrieval source."""
        source = self.retrieval(spec)
        gens = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
        return SeqState(index, list(ids), max_new_tokens, sampling, *gens,
                        retrieval=fork(source) if source is not None else None)  # fmt: skip

    def retire(self, sched: VerificationScheduler, trace: str | None,
               finished: Sequence[tuple[list[int], list[int]]], spec: SpecConfig | None = None
               ) -> str | None:  # fmt: skip
        """After a scheduler's generations: a hung draft is left off until its call returns,
        sources that learn from outputs see each (prompt, output) of `finished`, and the trace
        is saved to `trace` (its path returned)."""
        if sched.state.draft_hung:  # unused until the hung call returns (if it ever does)
            why = self.draft_disabled = sched.state.fallback
            sched.state.hung_call.add_done_callback(lambda _: self._draft_back(why))
        if sched.state.faults:  # the draft failed mid-call (or restarted): its rows are suspect
            self._kept.pop("draft", None)
        for prompt, output in finished:
            self.learn(prompt, output, spec)
        return str(sched.tracer.save(trace)) if trace else None

    def _draft_back(self, why: str) -> None:
        """The hung draft call returned (on the draft's worker thread): the device answers
        again, so the next generation may use it (its round loop starts from an empty
        cache)."""
        if self.draft_disabled == why:
            self.draft_disabled = None

    def learn(self, prompt: list[int], output: list[int], spec: SpecConfig | None = None) -> None:
        """A finished generation's output, for the retrieval sources that learn from them."""
        source = self.retrieval(spec or self.spec)
        if hasattr(source, "finish"):
            source.finish(prompt, output)

    def eos_ids(self, eos_token_id: int | Sequence[int] | None = None) -> set[int]:
        """The ids that end a generation: the given ones, else the tokenizer's and config's."""
        if eos_token_id is None:
            return eos_token_ids(self.tokenizer, self.generation_config)
        return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)

    def thread_budget(self, spec: SpecConfig | None = None) -> ThreadBudget | None:
        """Threads per pipeline and phase for `spec`'s overlap policy (None: a plan built
        without device specs keeps its runners' threads)."""
        if self.device_specs is None:
            return None
        spec = spec or self.spec
        target, draft = self.device_specs
        return ThreadBudget.for_devices(
            target, draft if self.draft is not None else None, spec.overlap,
            spec.overlap_target_cores or None,
        )  # fmt: skip

    def settings(self, spec: SpecConfig) -> RoundSettings:
        """The round loop's settings for `spec` (ValueError for what compile() resolves)."""
        if spec.mode == "auto":
            raise ValueError(
                "mode 'auto' is resolved by compile() (the best predicted mode); a Plan built "
                "by hand needs mirror, speculative or autoregressive"
            )
        if spec.draft_streams not in ("none", self.spec.draft_streams):
            raise ValueError(
                f"draft_streams {spec.draft_streams!r}: stream rows are built into the draft by "
                "compile(); compile with speculation.draft_streams to run them (a call can "
                "only turn them off, with 'none')"
            )
        if spec.amphista not in ("none", self.spec.amphista):
            raise ValueError(
                f"amphista {spec.amphista!r}: the heads are loaded by compile(); compile with "
                "speculation.amphista to run them (a call can only turn them off, with 'none')"
            )
        if spec.draft_exits not in ("none", self.spec.draft_exits):
            raise ValueError(
                f"draft_exits {spec.draft_exits!r}: the exits are built into the draft by "
                "compile(); compile with speculation.draft_exits to run them (a call can only "
                "turn them off, with 'none', or change draft_exit_threshold)"
            )
        if spec.tree_siblings == "auto":
            if self.auto_tree is None:
                raise ValueError(
                    "tree_siblings 'auto': this plan has no measured tree shape; compile with "
                    "speculation.tree_siblings: auto (or mode: auto) so it profiles one, or "
                    "pass an integer or a list per depth"
                )
            spec = spec.with_(tree_siblings=self.auto_tree)
        if any(spec.tree_shape) and self.no_trees:
            raise ValueError(f"tree_siblings: {self.no_trees}")
        check_block_bounds(spec, "<generate()>")  # a call's γ / trees / budget, as compile()'s
        has_draft = ((self.draft is not None and spec.model_draft) or spec.retrieval != "none"
                     or (self.amphista is not None and spec.amphista != "none"))  # fmt: skip
        mode = spec.mode if has_draft else "autoregressive"
        if not isinstance(spec.branch_budget, int):
            raise ValueError(
                "branch_budget 'auto' is resolved by compile(); a Plan built by hand needs "
                "an integer branch_budget"
            )
        return RoundSettings(
            mode,
            spec.num_draft_tokens,
            spec.exit_top_k,
            spec.branch_budget,
            spec.reuse,
            spec.draft_timeout_s,
            draft_retry_rounds=spec.draft_retry_rounds,
            retrieval_min_match=spec.retrieval_min_match,
            draft_stop=DraftPolicy(spec.draft_stop, spec.draft_stop_threshold),
            tree_siblings=spec.tree_shape,
            accept_rate=self.accept_rate,
            threads=self.thread_budget(spec),
            # the per-batch-size policy was chosen for the plan's proposer, mode and γ: a call
            # that overrides any of them runs its own settings at every batch size
            by_batch=self.batch_policy if _proposing(spec) == _proposing(self.spec) else (),
        )

    # --- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads (a hung draft worker is abandoned, not waited for) and
        release runners that hold processes (a tensor-parallel target stops its ranks)."""
        self.target_pipe.close()
        if self.draft_pipe:
            self.draft_pipe.close(wait=self.draft_disabled is None)
        for runner in (self.target, self.draft):
            release = getattr(runner, "close", None)
            if callable(release):
                release()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _proposing(spec: SpecConfig) -> tuple:
    """What a batch policy was chosen for: the mode, γ and who proposes."""
    return (spec.mode, spec.num_draft_tokens, spec.model_draft, spec.retrieval)
