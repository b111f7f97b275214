"""Chunk templates: a stream's repeated chunk, read without decoding.

A token stream is nearly all one event repeated with a different piece of text (same id, model and
created time). :func:`chunk_template` (chat/completions) and :func:`delta_template` (Responses API)
describe such an event by its JSON text around that text's string literal, so that the observer's
fast path (meter.tap.observer) counts the next ones by matching bytes instead of decoding them. Pure: a
payload's text and its decoded value in, a :class:`ChunkTemplate` or None out.

Rule 1: a template mirrors :meth:`~meter.tap.usage.ResponseFacts.add_chunk` and
        :meth:`~meter.tap.usage.ResponseFacts.add_event`: an event gets one only if ResponseFacts would
        do nothing with it but count its content characters. They must change together.
Rule 2: a split is verified, never assumed: the text with other values in its holes must parse to the
        event with only those values changed, or there is no template.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from meter.tap.estimate import message_chars, text_len

__all__ = ["ChunkTemplate", "chunk_template", "delta_template"]


class ChunkTemplate(NamedTuple):  # a NamedTuple: made once a stream, on the hot path, and cheap
    """A stream event that carried nothing but generated text, as its JSON text around that text's
    string literal (and around a sequence number, if it has one): ``head + <string> + tail``, or
    ``head + <integer> + middle + <string> + tail``.

    Any JSON text of that form, for any string literal and integer, has the template event's
    structure with only those two values changed: each is one lexical token, so the text around it
    parses as before. :class:`ResponseFacts` would therefore do exactly one thing with such an event:
    count ``base + len(string)`` content characters. A token stream is such events nearly all the way
    (same id, model and created time, one token of text each), which lets the observer count them
    without decoding them (meter.tap.observer). ``base``: characters the event's fixed text fields carry
    (usually 0)."""

    head: bytes
    middle: bytes | None  # None: no integer hole
    tail: bytes
    base: int


# Hole values for the check that a template's split is right: unlike any real value, with escapes.
_PROBE_TEXT = '\u2603 probe \\" \u00e9'
_PROBE_LITERAL = orjson.dumps(_PROBE_TEXT).decode()
_PROBE_NUMBER = 987_654_321
_PROBE_DIGITS = str(_PROBE_NUMBER)


def chunk_template(data: str, obj: object) -> ChunkTemplate | None:
    """The template of a chat/completions ``data:`` payload ``data`` that decoded to ``obj``, or None
    unless :meth:`ResponseFacts.add_chunk` would only count its content: one choice, no usage,
    error, perf_metrics or finish_reason, text in ``delta.content`` or ``delta.reasoning_content``
    (chat) or ``text`` (completions)."""
    if type(obj) is not dict or obj.get("usage") is not None or obj.get("perf_metrics") is not None:
        return None
    choices = obj.get("choices")
    if "error" in obj or type(choices) is not list or len(choices) != 1:
        return None
    choice = choices[0]
    if type(choice) is not dict or choice.get("finish_reason") is not None:
        return None
    delta = choice.get("delta")
    if type(delta) is dict:
        key = "content" if type(delta.get("content")) is str else "reasoning_content"
        return _template(data, obj, lambda o: o["choices"][0]["delta"], key, message_chars(delta))
    return _template(data, obj, lambda o: o["choices"][0], "text", text_len(choice.get("text")))


def delta_template(data: str, obj: object) -> ChunkTemplate | None:
    """The template of a Responses API ``*.delta`` event's payload (its ``sequence_number`` a hole
    too), or None unless :meth:`ResponseFacts.add_event` would only count its ``delta`` text."""
    if type(obj) is not dict:
        return None
    kind = obj.get("type")
    if type(kind) is not str or not kind.endswith(".delta") or kind == "response.audio.delta":
        return None
    return _template(data, obj, lambda o: o, "delta", text_len(obj.get("delta")), "sequence_number")


def _template(
    data: str,
    obj: dict[str, Any],
    holder: Callable[[Any], Any],
    key: str,
    chars: int,
    number_key: str | None = None,
) -> ChunkTemplate | None:
    """Split ``data`` around the string literal of ``holder(obj)[key]`` (and the integer of
    ``obj[number_key]`` before it, if there is one), and verify the split by parsing it with other
    values in the holes."""
    value = holder(obj).get(key)
    if type(value) is not str:
        return None
    text = _token_after(data, f'"{key}":', _string_end)
    if text is None:
        return None
    number = None
    if number_key is not None and type(obj.get(number_key)) is int:
        number = _token_after(data, f'"{number_key}":', _digits_end)
        if number is not None and number[1] > text[0]:
            number = None  # after the text: not supported, the number stays fixed
    probe = data[: text[0]] + _PROBE_LITERAL + data[text[1] :]
    if number is not None:
        probe = probe[: number[0]] + _PROBE_DIGITS + probe[number[1] :]
    try:
        parsed = orjson.loads(probe)
        if holder(parsed)[key] != _PROBE_TEXT:
            return None
        holder(parsed)[key] = value
        if number is not None and number_key is not None:
            if parsed[number_key] != _PROBE_NUMBER:
                return None
            parsed[number_key] = obj[number_key]
    except (orjson.JSONDecodeError, LookupError, TypeError):
        return None
    if parsed != obj:
        return None
    base = chars - len(value)
    if number is None:
        return ChunkTemplate(data[: text[0]].encode(), None, data[text[1] :].encode(), base)
    return ChunkTemplate(
        data[: number[0]].encode(), data[number[1] : text[0]].encode(), data[text[1] :].encode(), base
    )


def _token_after(text: str, key: str, end_of: Callable[[str, int], int | None]) -> tuple[int, int] | None:
    """(start, end) of the value token after ``key`` (a quoted key and colon that occurs exactly once
    in ``text``); ``end_of(text, start)`` finds where the token ends."""
    start = text.find(key)
    if start < 0 or text.find(key, start + 1) >= 0:
        return None
    start += len(key)
    while text[start : start + 1] in (" ", "\t"):
        start += 1
    end = end_of(text, start)
    return None if end is None else (start, end)


def _string_end(text: str, start: int) -> int | None:
    if text[start : start + 1] != '"':
        return None
    end = start
    while True:
        end = text.find('"', end + 1)
        if end < 0:
            return None
        if text[end - 1] != "\\":
            return end + 1
        escapes = len(text[start + 1 : end]) - len(text[start + 1 : end].rstrip("\\"))
        if escapes % 2 == 0:  # an escaped backslash, not an escaped quote: the literal ends here
            return end + 1


def _digits_end(text: str, start: int) -> int | None:
    end = start
    while text[end : end + 1].isdigit() and text[end].isascii():
        end += 1
    return end if end > start else None
