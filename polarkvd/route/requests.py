"""An OpenAI request as the router reads it: checked, and turned into the prompt's token ids.

Owns the request checks the router makes before choosing an engine (a bad body is a 400 in OpenAI's
error shape, `BadRequest`), and the tokenization with the model's own tokenizer and chat template
(transformers `AutoTokenizer`), so the router's token ids are the engine's. Everything else in a
body is the engine's to judge: it is forwarded untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


#: The largest token id a page key holds (keys.page_keys packs ids as 32-bit words).
_MAX_TOKEN_ID = 0xFFFFFFFF


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class BadRequest(Exception):
    """The client's request is malformed: a 400 with this message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_body(
    message: str, status: int, kind: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error, as vLLM's server writes one."""
    kinds = {
        400: "BadRequestError",
        404: "NotFoundError",
        405: "MethodNotAllowedError",
        502: "BadGatewayError",
        503: "ServiceUnavailableError",
    }
    return {
        "error": {
            "message": message,
            "type": kind or kinds.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }


def parse_body(raw: bytes, kind: str) -> dict[str, Any]:
    """The JSON body of a `completions` or `chat` request, with the fields the router needs checked."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if not isinstance(body.get("chat_template_kwargs") or {}, dict):
        raise BadRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("stream must be true or false", "stream")
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise BadRequest("messages must be a non-empty array of message objects", "messages")
        for m in msgs:
            if not isinstance(m.get("role"), str):
                raise BadRequest("every message needs a role (a string)", "messages")
    else:
        p = body.get("prompt")
        ok = (
            isinstance(p, str)
            or isinstance(p, list)
            and p
            and (
                all(_is_int(x) for x in p)
                or all(isinstance(x, str) for x in p)
                or all(isinstance(x, list) and all(_is_int(t) for t in x) for x in p)
            )
        )
        if not ok:
            raise BadRequest(
                "prompt must be a string, an array of strings, an array of token ids, or an array of those",
                "prompt",
            )
        # the first prompt is the one the router keys (routing is per request); the rest are the engine's
        first = p[0] if isinstance(p, list) and isinstance(p[0], list) else p
        if isinstance(first, list) and any(_is_int(t) and not 0 <= t <= _MAX_TOKEN_ID for t in first):
            raise BadRequest(f"token ids must be between 0 and {_MAX_TOKEN_ID}", "prompt")
    return body


class Tokenizer:
    """The model's tokenizer and chat template, loaded once from the model's folder (or hub name)."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        self.name = model
        self._tok = AutoTokenizer.from_pretrained(model)

    def completion(self, body: Mapping[str, Any]) -> list[int]:
        """A completion's prompt (the first of a batch: routing is per request) as token ids."""
        p = body["prompt"]
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, list):
            return [int(t) for t in p]
        return list(self._tok(p)["input_ids"])

    def chat(self, body: Mapping[str, Any]) -> list[int]:
        """A chat's messages through the model's chat template, as the engine will see them."""
        kwargs = dict(body.get("chat_template_kwargs") or {})
        try:
            out = self._tok.apply_chat_template(
                list(body["messages"]),
                tools=body.get("tools"),
                add_generation_prompt=body.get("add_generation_prompt", True),
                tokenize=True,
                **kwargs,
            )
        except Exception as e:  # the template's own checks (roles, content parts): the client's error
            raise BadRequest(f"the chat template refused the messages: {e}", "messages") from None
        ids: list[Any] = list(out["input_ids"] if isinstance(out, Mapping) else out)
        return [int(t) for t in ids]
