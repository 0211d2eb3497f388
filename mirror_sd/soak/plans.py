"""What both runs start from: the plan (as the CLI compiles one, its draft wrapped in a
`FaultyDraft`), the Spec-Bench prompts, and the reference output for every prompt and length
(the plan's target-only greedy decoding) that each answer must equal; `explain` says where a
changed output parts from its reference and by what margin."""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import mirror_sd.api as api
from mirror_sd import cli
from mirror_sd.bench.methods import target_margin
from mirror_sd.bench.specbench import load_questions
from mirror_sd.runtime.prompts import encode_prompt
from mirror_sd.soak.faults import install

MAX_EXPLAINED = 20  # changed outputs given the target's margin at their first difference


@dataclass(frozen=True)
class Reference:
    prompt: list[int]  # the prompt's token ids, as the plan encodes them
    tokens: list[int]
    text: str


def compile_plan(args: argparse.Namespace):
    """The plan of `args` (as the CLI compiles one), its draft wrapped in a FaultyDraft.
    Unless `--keep-batch-policy`, every batch size runs the plan's mode (a per-batch policy may
    switch a batch to autoregressive, where a draft fault has nothing to hit)."""
    plan = api.compile(args.target, args.draft, args.device_map, cache=args.cache,
                       progress=not args.quiet, draft_timeout_s=args.draft_timeout,
                       **cli._spec_overrides(args))  # fmt: skip
    if not args.keep_batch_policy:
        plan.batch_policy = ()
    return plan, install(plan, args.draft_timeout)


def load_prompts(args: argparse.Namespace) -> list[str]:
    return [q.text for q in load_questions(args.questions, per_category=args.per_category)]


def as_prompt(endpoint: str, text: str):
    """What the endpoint hands the plan: chat messages, or the raw text (no chat template)."""
    return [{"role": "user", "content": text}] if endpoint == "chat" else text


def references(plan, prompts: list[str], lengths: list[int],
               endpoints: tuple[str, ...]) -> dict[tuple[str, int, int], Reference]:  # fmt: skip
    """The target-only greedy output for each (endpoint, prompt index, length): what every
    answer must equal."""
    out = {}
    for endpoint, (p, text), n in itertools.product(endpoints, enumerate(prompts), lengths):
        prompt, chat = as_prompt(endpoint, text), endpoint == "chat"
        res = plan.generate(prompt, n, mode="autoregressive", chat=chat)
        ids = encode_prompt(plan.tokenizer, prompt, chat=chat)
        out[(endpoint, p, n)] = Reference(ids, list(res.tokens), res.text)
    return out


def explain(plan, mismatches: list[dict], refs: dict) -> None:
    """Add to each changed output (the first MAX_EXPLAINED) the reference token where it parts
    from the reference and the target's top-2 logit margin there (a small margin: rounding
    flipped a near-tie; a large one: a bug). Runs the plan's target: call it only when nothing
    else runs on the plan."""
    for m in mismatches[:MAX_EXPLAINED]:
        ref = refs[(m.get("kind", "chat"), m["prompt"], m["length"])]
        if "first_difference" not in m:  # a server answer is text: the tokens it starts with
            m["first_difference"] = token_prefix(plan.tokenizer, ref.tokens, m["got"])
        if m["first_difference"] < len(ref.tokens):
            m.update(target_margin(plan, ref.prompt, ref.tokens[: m["first_difference"]]))


def token_prefix(tokenizer, tokens: list[int], text: str) -> int:
    """How many of `tokens` decode to a prefix of `text`."""
    k = 0
    while k < len(tokens) and text.startswith(
        tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)
    ):
        k += 1
    return k


def parse_list(text: str, kind):
    """A comma-separated flag (`--lengths 16,32`) as a list of `kind`."""
    return [kind(v) for v in text.split(",") if v.strip()]
