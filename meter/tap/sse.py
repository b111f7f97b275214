"""Incremental Server-Sent-Events decoder (sans-I/O, after httpx's ``LineDecoder`` and h11).

Feed it the response body in whatever pieces the network delivers; it returns the events that those
bytes completed. It parses the WHATWG "event stream" format:

Rule 1: lines end in CR, LF or CRLF, and a CRLF split across two chunks is one line ending, not two
        (a CR that ends one chunk swallows an LF that starts the next).
Rule 2: a line may be split anywhere, even inside a multibyte UTF-8 character: only complete lines are
        decoded, and a line terminator byte never occurs inside a UTF-8 sequence. Invalid UTF-8 is
        replaced (U+FFFD), as the spec says, never raised.
Rule 3: a blank line dispatches the pending event; an event with no ``data`` line is not dispatched.
        ``data`` lines are joined with "\\n"; a single space after the colon is dropped; lines starting
        with ":" are comments (keep-alives); ``retry`` and unknown fields are ignored; an ``id`` with a
        NUL is ignored, and the last id sticks to later events (the spec's "last event ID").
Rule 4: one UTF-8 BOM at the very start of the stream is dropped.
Rule 5 (deliberate deviation): the spec discards an event left pending at end of stream; ``flush()``
        dispatches it, because an upstream that omits the final blank line still told us its usage.
        ``flush(truncated=True)`` (the stream was cut off) drops only an unterminated last line.

Rule 6 (a bound for hostile streams): with ``max_lines``, a ``feed`` that would complete more than
        ``max(max_lines, len(data) // 32)`` lines (a flood of blank lines, comments or one-byte
        fields: a real event is ~100-300 bytes in 2-3 lines) decodes nothing more: it returns no
        events and sets :attr:`SSEDecoder.overflowed`, before spending a step of Python per line.

Only the new bytes of each chunk are scanned for line endings (``bytes.find``/``split``, no per-byte
Python loop), so feeding one byte at a time costs O(n) overall, not O(n^2).

Fast path: an LLM stream's chunk is nearly always one whole ``data: {...}\n\n`` event with nothing
pending before it (:attr:`SSEDecoder.at_boundary`); such a chunk becomes its event directly. Anything
else (CR, other fields, several lines, a partial line, the stream's start) takes the general
line-by-line path. Both give the same events (tests/tap/test_fastpath.py compares them on every
fixture, split at random).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event. ``event`` is None when the stream gave no (or an empty) ``event:`` line,
    which the spec calls type "message"."""

    data: str
    event: str | None = None
    id: str | None = None


class SSEDecoder:
    """``feed(bytes) -> [SSEEvent]`` as bytes arrive, then ``flush() -> [SSEEvent]`` once at the end."""

    __slots__ = (
        "_at_start",
        "_data",
        "_event",
        "_fast",
        "_last_id",
        "_max_lines",
        "_partial",
        "_partial_len",
        "_skip_lf",
        "overflowed",
    )

    def __init__(self, *, max_lines: int | None = None, fast: bool = True) -> None:
        """``max_lines``: see Rule 6 (None: no bound). ``fast=False`` turns the whole-event shortcut
        off (the general path alone, against which the shortcut is tested)."""
        self._fast = fast
        self._max_lines = max_lines if max_lines is not None else 1 << 62
        self.overflowed = False  # a feed held more lines than max_lines allows (Rule 6)
        self._partial: list[bytes] = []  # pieces of the unterminated last line (no CR/LF inside)
        self._partial_len = 0
        self._skip_lf = False  # the previous chunk ended in CR: an LF starting this one is its CRLF
        self._at_start = True  # still deciding whether the stream starts with a BOM
        self._data: list[str] = []
        self._event: str | None = None
        self._last_id: str | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for an unterminated line (lets a caller bound memory against a line without end)."""
        return self._partial_len

    @property
    def pending_lines(self) -> int:
        """The ``data`` lines of the event being read (a caller checks this before
        :attr:`pending_bytes`, which costs one step per line)."""
        return len(self._data)

    @property
    def pending_bytes(self) -> int:
        """The size of the event being read: its ``data`` so far (characters, with the line ends that
        will join them) and the unterminated line. Lets a caller bound an event that never ends, be
        it one line without end or endless ``data`` lines without the blank line that ends them."""
        data = self._data
        return self._partial_len + (sum(map(len, data)) + len(data) if data else 0)

    @property
    def at_boundary(self) -> bool:
        """Nothing pending and the stream's start decided: the next byte begins a new line of a new
        event, so a chunk ``data: X\n\n`` (X without CR or LF) is exactly one event with data X."""
        return not (self._partial or self._data or self._at_start or self._skip_lf) and self._event is None

    def feed(self, data: bytes) -> list[SSEEvent]:
        if (
            data[-2:] == b"\n\n"
            and data[:6] == b"data: "
            and data.count(b"\n") == 2
            and b"\r" not in data
            and self._fast
            and self.at_boundary
        ):
            return [SSEEvent(data[6:-2].decode("utf-8", "replace"), None, self._last_id)]
        return self._feed_lines(data)

    def _feed_lines(self, data: bytes) -> list[SSEEvent]:
        """The general path: any bytes, any state."""
        if self._at_start:
            data = self._strip_bom(data)
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
        if not data:
            return []
        if b"\r" in data:
            # A final CR ends its line now; remember it so a following LF is not a second (empty) line.
            self._skip_lf = data[-1] == 0x0D
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if data[-1] == 0x0A:  # the usual case: the chunk ends on a line boundary
            if self._partial:
                self._partial.append(data)
                data = b"".join(self._partial)
                self._partial.clear()
                self._partial_len = 0
            lines = data.decode("utf-8", "replace").split("\n")
            lines.pop()  # the empty text after the final LF
            if len(lines) > self._max_lines and self._too_many(len(lines), len(data)):
                return []
            return self._lines(lines)
        last = data.rfind(b"\n")
        if last < 0:
            self._partial.append(data)
            self._partial_len += len(data)
            return []
        head = data[:last]
        if self._partial:
            self._partial.append(head)
            head = b"".join(self._partial)
            self._partial.clear()
        rest = data[last + 1 :]
        self._partial.append(rest)
        self._partial_len = len(rest)
        lines = head.decode("utf-8", "replace").split("\n")
        if len(lines) > self._max_lines and self._too_many(len(lines), len(data)):
            return []
        return self._lines(lines)

    def _too_many(self, lines: int, size: int) -> bool:
        """More than ``max_lines`` lines: more than one per 32 bytes too? (Rule 6)"""
        if lines <= size >> 5:
            return False
        self.overflowed = True
        self._partial.clear()
        self._partial_len = 0
        self._data.clear()
        return True

    def flush(self, *, truncated: bool = False) -> list[SSEEvent]:
        """End of stream: process an unterminated last line and dispatch a pending event (Rule 5).

        ``truncated``: the stream was cut off, so an unterminated last line is a fragment and is
        dropped; the event its complete lines built is still dispatched.
        """
        lines: list[str] = []
        self._at_start = False  # up to two held bytes of a would-be BOM are plain data now
        if self._partial:
            if not truncated:
                lines.append(b"".join(self._partial).decode("utf-8", "replace"))
            self._partial.clear()
            self._partial_len = 0
        self._skip_lf = False
        lines.append("")
        return self._lines(lines)

    def _strip_bom(self, data: bytes) -> bytes:
        # The BOM itself may arrive split across chunks: hold up to two bytes until it is decided.
        if self._partial:
            data = b"".join(self._partial) + data
            self._partial.clear()
            self._partial_len = 0
        if len(data) < len(_BOM) and _BOM.startswith(data):
            if data:
                self._partial.append(data)
                self._partial_len = len(data)
            return b""
        self._at_start = False
        return data[len(_BOM) :] if data.startswith(_BOM) else data

    def _lines(self, lines: list[str]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(SSEEvent("\n".join(data), self._event, self._last_id))
                    data.clear()
                self._event = None
                continue
            # Nearly every line of an LLM stream is "data: ...": test for it first, and slice once.
            if line.startswith("data: "):
                data.append(line[6:])
                continue
            if line.startswith("data:"):
                data.append(line[5:])
                continue
            if line[0] not in "ei":  # a comment (":"), "data" alone, or a field nobody reads
                if line == "data":  # "data" without a colon: an empty data line
                    data.append("")
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "event":
                self._event = value or None
            elif name == "id" and "\0" not in value:
                self._last_id = value
        return events
