"""Errors the OpenAI way: `{"error": {"message", "type", "param", "code"}}` with a status."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.responses import JSONResponse

from mirror_sd.runtime.prompts import PromptTooLongError


@dataclass
class ApiError(Exception):
    """An error a client gets as JSON. `param` names the request field at fault, if one is."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(param: str, message: str, code: str | None = None) -> ApiError:
    """400 for a request field: the message starts with the field's name."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def internal() -> ApiError:
    """500 without details: the traceback goes to the server's log, never to a client."""
    return ApiError(
        500,
        "the server failed while generating; the error is in the server's log",
        type="server_error",
        code="internal_error",
    )


def from_plan_error(exc: ValueError, prompt_param: str) -> ApiError:
    """A plan's ValueError about the input as a 400 naming the request field.

    `prompt_param` is the field the prompt came from (`messages` or `prompt`); the plan
    names `prompt` and `max_new_tokens` in its messages (runtime/prompts.py).
    """
    message = str(exc)
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, message, param=prompt_param, code="context_length_exceeded")
    if message.startswith("prompt"):
        return ApiError(400, prompt_param + message.removeprefix("prompt"), param=prompt_param)
    if message.startswith("max_new_tokens"):
        return ApiError(
            400, "max_tokens" + message.removeprefix("max_new_tokens"), param="max_tokens"
        )
    return ApiError(400, message)
