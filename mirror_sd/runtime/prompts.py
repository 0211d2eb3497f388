"""Turning user input (text, chat messages or token ids) into prompt token ids."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

Prompt = str | Sequence[dict] | Sequence[int]


class PromptTooLongError(ValueError):
    """The prompt plus the requested new tokens do not fit in the context."""


def encode_prompt(tok: PreTrainedTokenizerBase, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids for `prompt`.

    A string becomes one user message under the tokenizer's chat template (when it has
    one and `chat` is true); a list of {"role", "content"} dicts is a conversation; a list
    of ints is used as is.
    """
    if isinstance(prompt, str):
        if chat and tok.chat_template:
            prompt = [{"role": "user", "content": prompt}]
        else:
            return list(tok(prompt, add_special_tokens=True)["input_ids"])
    items = list(prompt)
    if not items:
        raise ValueError("empty prompt: give text, chat messages or at least one token id")
    if all(isinstance(t, int) for t in items):
        return items
    if all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in items):
        if not tok.chat_template:
            raise ValueError("chat messages given but the tokenizer has no chat template")
        ids = tok.apply_chat_template(items, add_generation_prompt=True, return_dict=False)
        return list(ids)
    raise TypeError("prompt must be a string, a list of {'role', 'content'} dicts, or token ids")


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
