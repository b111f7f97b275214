"""Token estimates from text size: the characters of text a request or response carries, and
ceil(chars / 4) of them.

When the upstream reports no usage (a stream the client cut off, an upstream that sends none) meter
estimates it: the prompt from the request body (:func:`estimate_prompt_tokens`, which quota admission
also reserves against), the completion from the generated characters that
:class:`~meter.tap.usage.ResponseFacts` counts with :func:`message_chars` and :func:`output_chars`.
Pure: already-parsed JSON values in, counts out.

Rule 1: an estimate is rough on purpose (no tokenizer, no chat template); it is good for admission and
        for filling a gap, never for billing what the upstream reported.
Rule 2: only text counts: message content, reasoning, tool-call arguments (and in a request, one token
        per pre-tokenised id); tool definitions, images and audio count nothing.
Rule 3: every reader tolerates any JSON shape: unexpected types count zero, never raise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "chars_to_tokens",
    "estimate_prompt_tokens",
    "message_chars",
    "output_chars",
    "parts_chars",
    "text_len",
]


def chars_to_tokens(chars: int) -> int:
    """ceil(chars / 4): the usual rule of thumb for English text with BPE tokenizers."""
    return -(-chars // 4)


# --- response side: generated text ---------------------------------------------------------------


def text_len(value: object) -> int:
    """The length of ``value`` if it is a string, else 0."""
    return len(value) if type(value) is str else 0


def message_chars(msg: Mapping[str, Any]) -> int:
    """Generated text of a chat ``message`` or streamed ``delta``: content, reasoning, tool arguments."""
    n = 0
    content = msg.get("content")
    if type(content) is str:
        n += len(content)
    elif type(content) is list:
        n += parts_chars(content)
    n += text_len(msg.get("reasoning_content"))
    calls = msg.get("tool_calls")
    if type(calls) is list:
        for call in calls:
            if type(call) is dict:
                fn = call.get("function")
                if type(fn) is dict:
                    n += text_len(fn.get("arguments"))
    fn = msg.get("function_call")  # the pre-tools API
    if type(fn) is dict:
        n += text_len(fn.get("arguments"))
    return n


def parts_chars(parts: list[Any]) -> int:
    """Text in a list of content parts: strings, or objects with a ``text``."""
    n = 0
    for part in parts:
        if type(part) is str:
            n += len(part)
        elif type(part) is dict:
            n += text_len(part.get("text"))
    return n


def output_chars(output: object) -> int:
    """Generated text in a Responses ``output`` list: message text, reasoning, function arguments."""
    if type(output) is not list:
        return 0
    n = 0
    for item in output:
        if type(item) is not dict:
            continue
        n += text_len(item.get("arguments"))
        for key in ("content", "summary"):
            parts = item.get(key)
            if type(parts) is list:
                n += parts_chars(parts)
    return n


# --- request-side estimate ---------------------------------------------------------------------------


def _content_chars(content: object) -> int:
    if type(content) is str:
        return len(content)
    if type(content) is list:
        return parts_chars(content)
    return 0


def _prompt_size(value: object) -> tuple[int, int] | None:
    """(chars, tokens) of a ``prompt``/``input``: text, a list of texts, token ids, or Responses items."""
    if type(value) is str:
        return len(value), 0
    if type(value) is not list:
        return None
    chars = tokens = 0
    for item in value:
        if type(item) is str:
            chars += len(item)
        elif type(item) is int:  # a pre-tokenised prompt: one id is one token
            tokens += 1
        elif type(item) is list:  # a batch of pre-tokenised prompts
            tokens += sum(1 for t in item if type(t) is int)
        elif type(item) is dict:  # a Responses input item: a message, or a tool call / its output
            chars += _content_chars(item.get("content"))
            chars += text_len(item.get("arguments")) + text_len(item.get("output"))
    return chars, tokens


def estimate_prompt_tokens(request_json: object) -> int | None:
    """A deliberately rough prompt size: ceil(chars / 4) of the text the client sent (message content,
    ``prompt``, ``input``, ``instructions``), plus one token per pre-tokenised id. It ignores tools,
    images, chat templates and the real tokenizer; it is good for admission estimates and for filling a
    gap, never for billing what the upstream reported. None if the body has none of those fields."""
    if not isinstance(request_json, dict):
        return None
    found = False
    chars = tokens = 0
    messages = request_json.get("messages")
    if type(messages) is list:
        found = True
        for msg in messages:
            if type(msg) is dict:
                chars += _content_chars(msg.get("content"))
    for key in ("prompt", "input"):
        size = _prompt_size(request_json.get(key))
        if size is not None:
            found = True
            chars += size[0]
            tokens += size[1]
    instructions = request_json.get("instructions")
    if type(instructions) is str:
        chars += len(instructions)
    return chars_to_tokens(chars) + tokens if found else None
