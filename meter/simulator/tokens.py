"""Deterministic token accounting: what the simulator counts as a prompt token and what it generates.

No tokenizer is involved; the rules are chosen so a test can compute every expected number by hand.

Rule 1: a prompt token is a whitespace-separated word (``str.split()``) of the input text.
Rule 2: every chat message, every Responses-API input item given as an object, and the Responses
        ``instructions`` add :data:`PER_MESSAGE_TOKENS` (the role/template overhead real chat templates
        add). Plain strings (a completions ``prompt``, an embeddings ``input``, a Responses ``input``
        given as a string) add no overhead.
Rule 3: already-tokenized input counts one token per integer (``prompt: [1, 2, 3]`` is 3 tokens;
        ``[[1, 2], [3]]`` is 3 tokens).
Rule 4: only text is counted. Content parts without a ``text`` field (images, audio, files) and tool
        definitions count nothing, so a prompt's count never depends on anything but its words.
Rule 5: generated token ``i`` (0-based, within one choice) is the text ``f"tok{i} "``; a choice of ``k``
        tokens is ``"tok0 tok1 ... tok{k-1} "``. Every choice of a request carries the same text.

This module is pure: it imports nothing outside the standard library.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

PER_MESSAGE_TOKENS = 4

# Generated tokens as bytes, precomputed because streaming writes one per SSE event.
_PRECOMPUTED = 4096
TOKEN_BYTES: tuple[bytes, ...] = tuple(b"tok%d " % i for i in range(_PRECOMPUTED))


def token_bytes(index: int) -> bytes:
    """The UTF-8 text of generated token ``index``."""
    if index < _PRECOMPUTED:
        return TOKEN_BYTES[index]
    return b"tok%d " % index


@lru_cache(maxsize=512)
def completion_text(tokens: int) -> str:
    """The full text of one choice of ``tokens`` generated tokens (cached: budgets repeat)."""
    if tokens <= _PRECOMPUTED:
        return b"".join(TOKEN_BYTES[:tokens]).decode()
    return "".join(f"tok{i} " for i in range(tokens))


def _words(value: Any) -> int:
    """Words of a message ``content``: a string, or a list of parts each a string or ``{"text": ...}``."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        total = 0
        for part in value:
            if isinstance(part, str):
                total += len(part.split())
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text.split())
        return total
    return 0


def _plain_input(value: Any) -> int:
    """A completions ``prompt`` or embeddings/Responses ``input``: text, token ids, or lists of either.
    Objects inside a list are Responses-API input items (messages) and carry the per-message overhead."""
    if isinstance(value, str):
        return len(value.split())
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += len(item.split())
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += sum(1 for x in item if isinstance(x, int)) + sum(
                len(x.split()) for x in item if isinstance(x, str)
            )
        elif isinstance(item, dict):
            total += PER_MESSAGE_TOKENS + _words(item.get("content"))
    return total


def count_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of a request body of any of the four inference APIs (rules 1-4)."""
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += PER_MESSAGE_TOKENS
            if isinstance(message, dict):
                total += _words(message.get("content"))
    if "prompt" in body:
        total += _plain_input(body["prompt"])
    if "input" in body:
        total += _plain_input(body["input"])
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += PER_MESSAGE_TOKENS + len(instructions.split())
    return total
