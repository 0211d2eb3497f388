"""OpenAI request bodies in, `GenRequest` out; OpenAI response and chunk bodies out.

Parsing checks every field this server reads and names the field in its 400; fields that
change the output in ways the plan cannot honour (logprobs, tools, penalties, n > 1) are
rejected rather than ignored; fields that do not change the output (`user`, `metadata`,
`store`) are ignored.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

from mirror_sd.serve.config import MAX_STOP_STRINGS
from mirror_sd.serve.errors import ApiError, invalid

CHAT, COMPLETION = "chat", "completion"
SEED_RANGE = 2**31  # seeds drawn for requests without one lie in [0, SEED_RANGE)
# field -> the value that means "off"; anything else is a 400 (the plan cannot honour it)
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "frequency_penalty": (None, 0, 0.0),
}


@dataclass(frozen=True)
class GenRequest:
    """One generation as the engine runs it (the same record for a batched engine).

    `prompt` is what `Plan.stream` takes: text, chat messages or token ids; `chat` applies
    the chat template to text. `temperature` / `top_p` None keep the plan's defaults; `seed`
    is the request's, or a fresh random one when it named none.
    """

    kind: str  # CHAT or COMPLETION: which response shape the client gets
    model: str
    prompt: str | list[dict] | list[int]
    chat: bool
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM's too): OpenAI's API has no top_k
    seed: int = 0
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False  # an extension (vLLM's name): the answer's token ids too

    @property
    def prompt_param(self) -> str:
        """The request field the prompt came from (named in a 400 about it)."""
        return "messages" if self.kind == CHAT else "prompt"

    def plan_kwargs(self) -> dict:
        """Keyword arguments of `Plan.stream` / `Plan.generate` for this request."""
        kwargs: dict = {"seed": self.seed, "chat": self.chat}
        if self.stop:
            kwargs["stop_strings"] = list(self.stop)
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        if self.top_k is not None:
            kwargs["top_k"] = self.top_k
        return kwargs


def parse(kind: str, body: object, default_max_tokens: int) -> GenRequest:
    """A validated `GenRequest` from a decoded JSON body, or ApiError 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: expected a JSON object, got {_kind(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "required: the id of a model from GET /v1/models")
    for field, off in UNSUPPORTED.items():
        if body.get(field) not in off:
            raise invalid(field, f"not supported by this server; omit it or send {off[-1]!r}")
    if body.get("n") not in (None, 1):
        raise invalid("n", "only n=1 is supported; send one request per choice")
    if kind == CHAT:
        prompt, chat = _messages(body.get("messages")), True
        max_field = (
            "max_completion_tokens"
            if body.get("max_completion_tokens") is not None
            else "max_tokens"
        )
    else:
        prompt, chat = _prompt(body.get("prompt")), False
        max_field = "max_tokens"
    stream = _optional(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and stream):
        raise invalid("stream_options", "an object, and only with stream: true")
    include_usage = _optional(
        options or {}, "include_usage", bool, False, "stream_options.include_usage"
    )
    max_tokens = _optional(body, max_field, Integral, default_max_tokens)
    if max_tokens < 1:
        raise invalid(max_field, f"expected a positive integer, got {max_tokens}")
    temperature = _optional(body, "temperature", Real, None)
    if temperature is not None and not 0 <= temperature <= 2:
        raise invalid("temperature", f"expected a number in [0, 2], got {temperature}")
    top_p = _optional(body, "top_p", Real, None)
    if top_p is not None and not 0 < top_p <= 1:
        raise invalid("top_p", f"expected a number in (0, 1], got {top_p}")
    top_k = _optional(body, "top_k", Integral, None)
    if top_k is not None and top_k < 0:
        raise invalid("top_k", f"expected an integer >= 0 (0: no top-k), got {top_k}")
    return GenRequest(
        kind=kind,
        model=model,
        prompt=prompt,
        chat=chat,
        max_tokens=int(max_tokens),
        temperature=None if temperature is None else float(temperature),
        top_p=None if top_p is None else float(top_p),
        top_k=None if top_k is None else int(top_k),
        seed=int(
            seed if (seed := _optional(body, "seed", Integral, None)) is not None else _fresh_seed()
        ),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=include_usage,
        return_token_ids=_optional(body, "return_token_ids", bool, False),
    )


def _fresh_seed() -> int:
    """A seed for a request that names none: samples differ between such requests, as with
    OpenAI's API (greedy decoding does not depend on it)."""
    return secrets.randbelow(SEED_RANGE)


def _optional(body: dict, field: str, typ: type, default, name: str | None = None):
    """body[field] checked against `typ` (bools are not numbers); `default` when absent or null."""
    value = body.get(field)
    if value is None:
        return default
    is_number = typ in (Integral, Real)
    if not isinstance(value, typ) or (is_number and isinstance(value, bool)):
        want = {bool: "a boolean", Integral: "an integer", Real: "a number"}[typ]
        raise invalid(name or field, f"expected {want}, got {_kind(value)} {value!r}")
    return value


def _messages(messages: object) -> list[dict]:
    """Chat messages as [{"role", "content": str}]; content parts of type text are joined."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "required: a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid(f"messages[{i}]", "expected an object with a string `role`")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise invalid(f"messages[{i}].content", "only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise invalid(
                f"messages[{i}].content", f"expected a string or text parts, got {_kind(content)}"
            )
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(prompt: object) -> str | list[int]:
    """A completion prompt: a string or token ids; a list holding one of those is unwrapped."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, (str, list)) for p in prompt)
    ):
        raise invalid(
            "prompt",
            f"{len(prompt)} prompts in one request are not supported; send one prompt per request",
        )
    raise invalid("prompt", "required: a string or a non-empty list of token ids")


def _stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "expected a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    return tuple(stops)


def _kind(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# --- responses ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Reply:
    """The id, timestamp and shape of one request's response (whole or in SSE chunks)."""

    def __init__(self, req: GenRequest):
        self.kind, self.model = req.kind, req.model
        prefix = "chatcmpl" if req.kind == CHAT else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if req.kind == CHAT else "text_completion"
        self.return_token_ids = req.return_token_ids

    def _envelope(self, obj: str, choices: list, usage: Usage | None) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        body["choices"] = choices
        body["usage"] = usage.body() if usage else None
        return body

    def full(
        self, text: str, finish_reason: str, usage: Usage, token_ids: Sequence[int] = ()
    ) -> dict:
        """The non-streaming response; under `return_token_ids`, `token_ids` on the choice."""
        if self.kind == CHAT:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=finish_reason, logprobs=None)
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return self._envelope(self.object, [choice], usage)

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        first: bool = False,
        token_ids: Sequence[int] = (),
    ) -> dict:
        """One streamed chunk: new text, or (text None) the closing chunk with the reason and,
        under `return_token_ids`, every generated token id (`token_ids`)."""
        if self.kind == CHAT:
            delta: dict = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta}
            obj = "chat.completion.chunk"
        else:
            choice, obj = {"index": 0, "text": text or ""}, "text_completion"
        choice.update(finish_reason=finish_reason, logprobs=None)
        if self.return_token_ids and finish_reason is not None:
            choice["token_ids"] = list(token_ids)
        return self._envelope(obj, [choice], None)

    def usage_chunk(self, usage: Usage) -> dict:
        """The last chunk under `stream_options.include_usage`: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == CHAT else "text_completion"
        return self._envelope(obj, [], usage)
