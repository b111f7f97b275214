"""What meter needs to know about a client's request body, read without changing it.

Pure: bytes in, values out. A body that is not a JSON object (a file upload, invalid JSON, an empty
GET) is still forwarded unchanged; meter then simply knows less about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from meter.token_estimate import estimate_prompt_tokens


@dataclass(frozen=True, slots=True)
class RequestInfo:
    model: str | None = None
    stream: bool = False
    prompt_tokens_estimate: int | None = None
    json: dict[str, Any] | None = None


EMPTY = RequestInfo()


def inspect_request(body: bytes) -> RequestInfo:
    # Cheap check first: only a JSON object can name a model.
    stripped = body[:64].lstrip()[:1]
    if stripped != b"{":
        return EMPTY
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return EMPTY
    if not isinstance(parsed, dict):
        return EMPTY
    model = parsed.get("model")
    return RequestInfo(
        model=model if isinstance(model, str) else None,
        stream=parsed.get("stream") is True,
        prompt_tokens_estimate=estimate_prompt_tokens(parsed),
        json=parsed,
    )
