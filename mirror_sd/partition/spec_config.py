"""`SpecConfig`: every speculation tunable and its one default.

The `speculation:` section of a device map maps 1:1 onto these fields; `compile()`
keyword arguments override them. Nothing else in the project holds a default for them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

MODES = ("mirror", "speculative", "autoregressive")  # what a plan runs
CONFIG_MODES = (*MODES, "auto")  # "auto": compile() picks the mode with the best predicted speedup
DRAFT_STOPS = ("none", "confidence", "entropy")  # draft-length policies (runtime.draft_policy)
OVERLAPS = ("share", "split")  # threads in mirror's overlap on one physical device (threads.py)


# `draft_exit_threshold: auto`: the thresholds compile measures (a short speculative generation
# each) before keeping the fastest; 1.0 is "exits almost never fire" (only a certain top-1)
EXIT_THRESHOLDS = (0.5, 0.7, 0.9, 1.0)


def _count(v: object) -> bool:
    """A non-negative integer (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class SpecConfig:
    mode: str = "mirror"  # mirror | speculative (draft then verify, no overlap) | autoregressive
    # | auto (compile() profiles and keeps the mode the cost model predicts fastest)
    num_draft_tokens: int = 4  # γ: draft tokens per round (block = γ + 1 target positions)
    exit_layer: int | str = (
        "auto"  # ℓe: target layers [0, ℓe) form the prefix; "auto" = partitioner
    )
    exit_top_k: int = 4  # κ: exit candidates per block position sent over the token channel
    branch_budget: int | str = "auto"  # max branches rolled out per round; "auto" = fit t_suf
    reuse: bool = True  # start the next round from a prepared branch on a hit
    exit_head: str = "lm_head"  # "lm_head" (final norm + LM head at ℓe), "trained" or a head file
    exit_vocab_size: int = 0  # VocabTrim for the exit head: K most frequent target tokens; 0 = all
    draft_vocab_size: int = 0  # VocabTrim for the draft's LM head: K tokens; 0 = full vocabulary
    draft_streams: str = "none"  # speculative streaming: "none", "trained" or a stream table folder
    # Amphista heads on the target's hidden state at ℓe propose each next block: "none",
    # "trained" (the heads `mirror-sd train amphista` cached for this target) or a heads file
    amphista: str = "none"
    # S2D's sorted early exits on a torch draft (devices/sorted_exits.py): "none", "lens" (the
    # draft's own head at 1/4 and 1/2 of its depth) or "trained" (`mirror-sd train exit-head`
    # run on the draft); a step emits at the first exit whose top-1 probability is at least
    # draft_exit_threshold; "auto": compile measures EXIT_THRESHOLDS and keeps the fastest
    draft_exits: str = "none"
    draft_exit_threshold: float | str = "auto"
    # speculative, greedy: the draft's next-best tokens as tree leaves; an int (the same at every
    # depth), a list (per depth 1..γ; missing depths 0, depths past γ unused) or "auto" (compile
    # sizes and shapes the tree from measured block costs and coverage: partition/tree_shape.py)
    tree_siblings: int | str | tuple[int, ...] = 0
    draft_stop: str = "none"  # stop drafting early: none | confidence (Kangaroo) | entropy (SVIP)
    draft_stop_threshold: float = 0.0  # confidence: stop below this top-1 prob; entropy: above nats
    max_len: int = 2048  # context length: KV cache rows preallocated on both devices
    draft_timeout_s: float = 30.0  # a draft step slower than this counts as a device failure
    # after a draft error (not a hang), target-only rounds before the draft is tried again,
    # doubled after each further error (a batch session can outlive a transient fault); 0: never
    draft_retry_rounds: int = 16
    model_draft: bool = True  # use the draft model; False = retrieval sources only (draft idle)
    retrieval: str = "none"  # model-free draft source tried before the model draft each round
    retrieval_min_match: int = 3  # use its proposal when the suffix match is at least this long
    retrieval_max_ngram: int = 4  # longest n-gram the pld / hd sources index
    # keep finished sequences' K/V rows between generations; a prompt sharing their prefix
    # prefills only the rest (chat turns, one system prompt). Off in the API (a fresh prefill
    # is the reference); `mirror-sd serve` turns it on (docs/runtime.md, *Prefix caching*)
    prefix_cache: bool = False
    # target and draft on one physical device (one CPU): while mirror overlaps them, "share"
    # keeps every core for both (the OS shares them; work-conserving), "split" gives the target
    # overlap_target_cores (0 = half) and the draft the rest. Alone, a pipeline has every core.
    overlap: str = "share"
    overlap_target_cores: int = 0
    temperature: float = 0.0  # default sampling settings for generate(); 0 = greedy
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in CONFIG_MODES:
            raise ValueError(
                f"speculation.mode {self.mode!r}: expected one of {', '.join(CONFIG_MODES)}"
            )
        if not isinstance(self.exit_head, str) or not self.exit_head:
            raise ValueError(
                f"speculation.exit_head {self.exit_head!r}: expected 'lm_head' (final norm + LM "
                "head at the exit layer), 'trained' (the head `mirror-sd train exit-head` cached "
                "for this target and ℓe) or the path of a trained head file"
            )
        if not isinstance(self.draft_streams, str) or not self.draft_streams:
            raise ValueError(
                f"speculation.draft_streams {self.draft_streams!r}: expected 'none', 'trained' "
                "(the stream rows `mirror-sd train streams` cached for this draft and target) "
                "or the folder of a stream table"
            )
        if not isinstance(self.amphista, str) or not self.amphista:
            raise ValueError(
                f"speculation.amphista {self.amphista!r}: expected 'none', 'trained' (the heads "
                "`mirror-sd train amphista` cached for this target) or the path of a heads file"
            )
        if self.draft_exits not in ("none", "lens", "trained"):
            raise ValueError(
                f"speculation.draft_exits {self.draft_exits!r}: expected 'none', 'lens' (the "
                "draft's own head at 1/4 and 1/2 of its depth) or 'trained' (exit heads "
                "`mirror-sd train exit-head` trained on the draft)"
            )
        v = self.draft_exit_threshold
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int | float)
                            or not 0.0 <= v <= 1.0):  # fmt: skip
            raise ValueError(
                f"speculation.draft_exit_threshold must be a probability in [0, 1] or 'auto' "
                f"(compile measures {', '.join(map(str, EXIT_THRESHOLDS))}), got {v!r}"
            )
        for name in ("exit_vocab_size", "draft_vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(
                    f"speculation.{name} must be 0 (full vocabulary) or a positive integer, got {v!r}"
                )
        self._check_tree()
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(
                f"speculation.prefix_cache must be true or false, got {self.prefix_cache!r}"
            )
        if self.overlap not in OVERLAPS:
            raise ValueError(
                f"speculation.overlap {self.overlap!r}: expected one of {', '.join(OVERLAPS)}"
            )
        v = self.overlap_target_cores
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(
                f"speculation.overlap_target_cores must be 0 (half the cores) or a positive "
                f"integer, got {v!r}"
            )
        # the names live in the runtime's registry (runtime/drafters/sources.py), which this
        # pure layer does not import: compile() and the plan check the name against it
        if not isinstance(self.retrieval, str) or not self.retrieval:
            raise ValueError(
                f"speculation.retrieval must be 'none' or a retrieval source's name, "
                f"got {self.retrieval!r}"
            )
        for name in (
            "num_draft_tokens",
            "exit_top_k",
            "max_len",
            "retrieval_min_match",
            "retrieval_max_ngram",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"speculation.{name} must be a positive integer, got {getattr(self, name)!r}"
                )
        for name in ("exit_layer", "branch_budget"):
            v = getattr(self, name)
            if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(
                    f"speculation.{name} must be 'auto' or a positive integer, got {v!r}"
                )
        for name in ("temperature", "top_p", "draft_timeout_s", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"speculation.{name} must be a number, got {v!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                "speculation: temperature must be >= 0, top_p in (0, 1], top_k >= 0 "
                f"(got {self.temperature}, {self.top_p}, {self.top_k})"
            )
        if self.draft_timeout_s <= 0:
            raise ValueError(f"speculation.draft_timeout_s must be > 0, got {self.draft_timeout_s}")
        v = self.draft_retry_rounds
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"speculation.draft_retry_rounds must be an integer >= 0 (0: never "
                             f"retry a failed draft), got {v!r}")  # fmt: skip
        self._check_draft_stop()

    def _check_tree(self) -> None:
        v = self.tree_siblings
        if isinstance(v, list):  # a list from the API (YAML lists arrive as tuples)
            object.__setattr__(self, "tree_siblings", v := tuple(v))
        if not (v == "auto" or _count(v) or (isinstance(v, tuple) and all(map(_count, v)))):
            raise ValueError(
                "speculation.tree_siblings must be 0 (no tree), a positive integer (sibling "
                "leaves at every depth), a list of such integers (per depth 1..γ) or 'auto' "
                f"(compile sizes the tree), got {v!r}"
            )

    @property
    def tree_shape(self) -> tuple[int, ...]:
        """Sibling leaves per depth 1..γ (all 0: a chain; a list's depths past γ are unused, so
        a call with a smaller γ keeps the compiled shape's first depths). Raises ValueError for
        'auto', which compile() resolves."""
        v, gamma = self.tree_siblings, self.num_draft_tokens
        if v == "auto":
            raise ValueError(
                "tree_siblings 'auto' is resolved by compile() from a measured profile; a call "
                "or a Plan built by hand needs an integer or a list per depth"
            )
        if isinstance(v, int):
            return (v,) * gamma
        return tuple(v[:gamma]) + (0,) * (gamma - len(v))

    def _check_draft_stop(self) -> None:
        """The threshold's meaning depends on the policy, so each gets its own range and hint.
        With "none" the threshold is ignored (a per-call draft_stop="none" override must not
        also have to reset it)."""
        if self.draft_stop not in DRAFT_STOPS:
            raise ValueError(
                f"speculation.draft_stop {self.draft_stop!r}: expected one of {', '.join(DRAFT_STOPS)}"
            )
        t = self.draft_stop_threshold
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise ValueError(f"speculation.draft_stop_threshold must be a number, got {t!r}")
        if self.draft_stop == "confidence" and not 0 < t < 1:
            raise ValueError(
                f"speculation.draft_stop_threshold must be in (0, 1) with draft_stop 'confidence' "
                f"(drafting stops once the draft's top-1 probability falls below it; typical "
                f"0.5-0.8), got {t}"
            )
        if self.draft_stop == "entropy" and not t > 0:
            raise ValueError(
                f"speculation.draft_stop_threshold must be > 0 nats with draft_stop 'entropy' "
                f"(drafting stops once the draft distribution's entropy exceeds it; try 1-3, a "
                f"value at or above ln(vocabulary size) never stops), got {t}"
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def with_(self, **overrides) -> SpecConfig:
        """A copy with some fields replaced; unknown names are an error listing valid ones."""
        unknown = set(overrides) - set(self.field_names())
        if unknown:
            raise TypeError(
                f"unknown speculation setting(s) {sorted(unknown)}; valid: {', '.join(self.field_names())}"
            )
        return replace(self, **overrides)
