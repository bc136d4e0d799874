"""Answers of the CPU server in the shapes SGLang's FastAPI app gives them: a raised
:class:`Reply` becomes the HTTP answer; 400s for value errors (SGLang's ``ValueError`` shape),
validation errors (FastAPI's), failed admin actions (``success: false``)."""

from __future__ import annotations

from typing import Any

from megatron_gopd.rollout.protocol import error_body

__all__ = ["Reply", "fail", "invalid", "require", "typed", "value_error"]


class Reply(Exception):
    def __init__(self, status: int, body: Any = None, text: str | None = None):
        self.status, self.body, self.text = status, body, text


def value_error(msg: str) -> Reply:
    return Reply(400, error_body("value", msg))


def invalid(msg: str) -> Reply:
    return Reply(400, error_body("validation", msg))


def require(body: Any, *keys: str) -> dict:
    if not isinstance(body, dict):
        raise invalid("Input should be a valid dictionary")
    for k in keys:
        if k not in body:
            raise invalid(f"{k}: Field required")
    return body


def typed(body: dict, key: str, kind: type | tuple, default: Any = None) -> Any:
    """``body[key]`` if it has the type FastAPI would accept, else a 400 (not a 500)."""
    v = body.get(key, default)
    if v is None:
        return v
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) and bool not in kinds:
        raise invalid(f"{key}: Input should be a valid {kinds[0].__name__}")
    if not isinstance(v, kinds):
        raise invalid(f"{key}: Input should be a valid {kinds[0].__name__}")
    return v


def fail(message: str) -> Reply:
    return Reply(400, {"success": False, "message": message})
