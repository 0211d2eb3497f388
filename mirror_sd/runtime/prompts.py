"""Turning user input (text, chat messages or token ids) into prompt token ids."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral

from transformers import PreTrainedTokenizerBase

Prompt = str | Sequence[dict] | Sequence[int]
PROMPT_KINDS = "give a string, a list of {'role', 'content'} chat messages, or a list of token ids"


class PromptTooLongError(ValueError):
    """The prompt plus the requested new tokens do not fit in the context."""


def encode_prompt(
    tok: PreTrainedTokenizerBase, prompt: Prompt, chat: bool = True, vocab_size: int | None = None
) -> list[int]:
    """Token ids for `prompt`.

    A string becomes one user message under the tokenizer's chat template (when it has
    one and `chat` is true); a list of {"role", "content"} dicts is a conversation; a list
    of ints is used as is (each must lie in [0, `vocab_size`) when that is given).

    Raises:
        ValueError: naming `prompt`: None or of another type, empty, a token id that is not
            an int or lies outside the vocabulary, text that is not valid Unicode (an
            unpaired surrogate such as "\\ud800" cannot be encoded as UTF-8), or chat messages
            for a tokenizer without a chat template.
    """
    if isinstance(prompt, str):
        _check_text(prompt, "prompt")
        if chat and tok.chat_template:
            prompt = [{"role": "user", "content": prompt}]
        else:
            return _non_empty(list(tok(prompt, add_special_tokens=True)["input_ids"]))
    if isinstance(prompt, (bytes, bytearray, Mapping)) or not isinstance(prompt, Iterable):
        hint = "; wrap one chat message in a list" if isinstance(prompt, Mapping) else ""
        kind = "None" if prompt is None else type(prompt).__name__
        raise ValueError(f"prompt: got {kind}; {PROMPT_KINDS}{hint}")
    items = list(prompt)
    if not items:
        raise ValueError("prompt: empty; give text, chat messages or at least one token id")
    if all(isinstance(t, Integral) and not isinstance(t, bool) for t in items):
        ids = [int(t) for t in items]
        bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            where = "[0, vocab size)" if vocab_size is None else f"[0, {vocab_size})"
            raise ValueError(
                f"prompt: token id {bad[0]} is outside the target's vocabulary {where} "
                f"({len(bad)} such id(s)); encode text with the plan's tokenizer"
            )
        return ids
    if all(isinstance(m, Mapping) and {"role", "content"} <= m.keys() for m in items):
        if not tok.chat_template:
            raise ValueError(
                "prompt: chat messages given but the tokenizer has no chat template; "
                "give plain text (chat=False) or token ids"
            )
        for i, m in enumerate(items):
            for key in ("role", "content"):
                if isinstance(m[key], str):
                    _check_text(m[key], f"prompt[{i}][{key!r}]")
        ids = tok.apply_chat_template(items, add_generation_prompt=True, return_dict=False)
        return _non_empty(list(ids))
    kinds = sorted({type(t).__name__ for t in items})
    raise ValueError(f"prompt: a list of {', '.join(kinds)}; {PROMPT_KINDS}")


def _check_text(text: str, name: str) -> None:
    """Text the tokenizer can take: encodable as UTF-8 (no unpaired surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name}: not valid Unicode text: {text[e.start : e.end]!r} at index {e.start} "
            "cannot be encoded as UTF-8 (an unpaired surrogate?); decode the input with "
            "errors='replace' or remove it"
        ) from None


def _non_empty(ids: list[int]) -> list[int]:
    if not ids:
        raise ValueError("prompt: encodes to no tokens; give some text or token ids")
    return ids


def check_max_new_tokens(max_new_tokens: object) -> int:
    """`max_new_tokens` as an int, or ValueError when it is not a positive integer."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral):
        raise ValueError(
            f"max_new_tokens: expected a positive integer, got {type(max_new_tokens).__name__} "
            f"{max_new_tokens!r}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens}")
    return int(max_new_tokens)


def check_fits(n_prompt: int, max_new_tokens: int, context: int, slack: int = 0) -> None:
    """Raise PromptTooLongError naming the numbers when prompt + new tokens exceed `context`."""
    need = n_prompt + max_new_tokens + slack
    if need > context:
        raise PromptTooLongError(
            f"prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens}"
            + (f" + {slack} speculative rows" if slack else "")
            + f" = {need} exceeds the context of {context} tokens; shorten the prompt, "
            "lower max_new_tokens, or raise max_len"
        )


def eos_token_ids(tok: PreTrainedTokenizerBase, generation_config: dict | None = None) -> set[int]:
    """EOS ids from the tokenizer and the model's generation_config.json (which may list several)."""
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    eos = (generation_config or {}).get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(e) for e in eos)
    return ids
