"""What meter needs to know about a client's request body, read without changing it.

Rule 1: what meter reserves and records does not depend on the body's layout: whitespace, a UTF-8 BOM,
        UTF-16/32, key order and nesting are all read as a JSON reader on the upstream would read
        them (orjson first; Python's ``json`` for what orjson refuses).
Rule 2: a non-empty body that is still not a JSON object (a file upload, invalid JSON) is forwarded
        unchanged; meter then knows only its size (``unreadable_bytes``), and quota admission reserves
        conservatively for it (meter.quota.spend).
Rule 3: the model name is cut to ``meter.bounds.MODEL`` characters (it reaches records and labels).

Pure: bytes in, values out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from meter import bounds
from meter.bounds import cut
from meter.tap.estimate import estimate_prompt_tokens


@dataclass(frozen=True, slots=True)
class RequestInfo:
    model: str | None = None
    stream: bool = False
    prompt_tokens_estimate: int | None = None
    json: dict[str, Any] | None = None
    unreadable_bytes: int = 0  # the size of a non-empty body that is not a JSON object (Rule 2)


EMPTY = RequestInfo()


def inspect_request(body: bytes) -> RequestInfo:
    """What the body says (Rules 1-2). Never raises."""
    if not body:
        return EMPTY
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = _lenient_json(body)
    if type(parsed) is not dict:
        return RequestInfo(unreadable_bytes=len(body))
    model = parsed.get("model")
    return RequestInfo(
        model=cut(model, bounds.MODEL) if type(model) is str else None,
        stream=parsed.get("stream") is True,
        prompt_tokens_estimate=estimate_prompt_tokens(parsed),
        json=parsed,
    )


def _lenient_json(body: bytes) -> object:
    """What Python's own JSON reader makes of a body orjson refused: it detects a BOM and UTF-16/32
    and takes NaN (as upstreams written in Python do), so such a body cannot pass unread."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None
