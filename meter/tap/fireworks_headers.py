"""Fireworks' metrics: what Fireworks says about a request besides the body's usage.

They come from the response's ``fireworks-*`` headers (:func:`fireworks_metrics`, read for every
response) and from ``perf_metrics`` objects in a body or a stream (:func:`perf_metrics`, sent when the
client asked ``perf_metrics_in_response: true``), both under the same hyphenated names,
``perf_metrics`` without the ``fireworks-`` prefix. Pure: header mappings and already-parsed JSON
values in, a :class:`FireworksMetrics` out; nothing here does I/O.

Rule 1: "not reported" is not zero. A metric that is absent, not a number or not finite is skipped; a
        token count that is not a whole non-negative number is ``None``.
Rule 2: Fireworks counts cached tokens inside ``prompt-tokens``; they are kept as reported.
Rule 3: perf_metrics win over headers, metric by metric (:meth:`FireworksMetrics.over`).
Rule 4: every reader tolerates any value: unexpected types are skipped, never raised.
Rule 5: what is kept is bounded (a hostile upstream may send thousands of headers or a perf_metrics
        object of any size): every number is finite, a count or time's magnitude is below 2**53 (a
        count stays exact, a time finite in milliseconds), ``other`` holds at most
        ``meter.bounds.METRICS`` metrics (the first ones read; ``over`` keeps its own first) with names
        cut to ``meter.bounds.METRIC_NAME`` characters; at most ``_ITEMS`` entries of a perf_metrics
        object are looked at (and of a head, at most its 128 headers: meter.forward.upstream refuses more).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from math import isfinite

from meter import bounds
from meter.bounds import cut
from meter.records import first_known

__all__ = [
    "NO_METRICS",
    "FireworksHeaders",
    "FireworksMetrics",
    "fireworks_metrics",
    "perf_metrics",
]

_LIMIT = float(2**53)  # no metric's magnitude reaches this (Rule 5)
_METRICS, _NAME = bounds.METRICS, bounds.METRIC_NAME  # what ``other`` keeps (Rule 5)
_ITEMS = 128  # perf_metrics entries looked at (Rule 5)


def _number(value: object) -> float | None:
    """A finite number given as a JSON number or a decimal string (headers, perf_metrics)."""
    if type(value) is str:
        try:
            value = float(value)
        except ValueError:
            return None
    elif type(value) is int:
        if not abs(value) < _LIMIT:
            return None
        value = float(value)
    if type(value) is float and abs(value) < _LIMIT:  # NaN and the infinities fail this too
        return value
    return None


def _whole(value: float | None) -> int | None:
    """A count given as a decimal (a header "123", a perf_metrics 123.0); None unless whole and in
    [0, 2**53)."""
    if value is None or value < 0 or value >= _LIMIT or not value.is_integer():
        return None
    return int(value)


@dataclass(frozen=True, slots=True)
class FireworksMetrics:
    """What Fireworks says about a request besides the body's usage, from ``fireworks-*`` headers or a
    ``perf_metrics`` object (same hyphenated names, without the ``fireworks-`` prefix). Times are
    seconds; ``other`` holds every other numeric metric under its prefix-less name."""

    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    server_ttft_s: float | None = None
    server_processing_s: float | None = None
    other: dict[str, float] = field(default_factory=dict)

    def over(self, fallback: FireworksMetrics) -> FireworksMetrics:
        """These metrics, with ``fallback`` filling what they lack (perf_metrics over headers)."""
        return FireworksMetrics(
            prompt_tokens=first_known(self.prompt_tokens, fallback.prompt_tokens),
            cached_tokens=first_known(self.cached_tokens, fallback.cached_tokens),
            server_ttft_s=first_known(self.server_ttft_s, fallback.server_ttft_s),
            server_processing_s=first_known(self.server_processing_s, fallback.server_processing_s),
            other=_merged(self.other, fallback.other),
        )


def _merged(first: dict[str, float], fallback: dict[str, float]) -> dict[str, float]:
    """``fallback`` updated with ``first``; past ``bounds.METRICS`` metrics, ``first``'s come first."""
    merged = {**fallback, **first}
    if len(merged) > bounds.METRICS:
        merged = dict(list({**first, **merged}.items())[: bounds.METRICS])
    return merged


FireworksHeaders = FireworksMetrics  # the header view is the same record

NO_METRICS = FireworksMetrics()
_PREFIX = "fireworks-"


# The metrics FireworksMetrics names, by their position in _metrics' list; any other goes to ``other``.
_NAMED = {
    "prompt-tokens": 0,
    "cached-prompt-tokens": 1,
    "server-time-to-first-token": 2,
    "server-processing-time": 3,
}
# ASCII characters no string float() accepts can start with (it takes whitespace, a sign, a digit, a
# point, "inf"/"infinity"/"nan"): such a value is skipped without the cost of float() raising.
_NOT_A_NUMBER_START = frozenset(chr(c) for c in range(128)) - frozenset(
    "0123456789+-.iInN" + "".join(chr(c) for c in range(128) if chr(c).isspace())
)


def _metrics(items: Iterable[tuple[str, object]], prefixed: bool = False) -> FireworksMetrics:
    """``items``: (name, value) pairs; ``prefixed``: only names starting ``fireworks-`` count, and
    without it. Runs for every response (the headers), so the common case is inlined."""
    named: list[float | None] | None = None
    other: dict[str, float] = {}
    skip = len(_PREFIX)
    for name, raw in items:
        if prefixed:
            if not name.startswith(_PREFIX):
                continue
            name = name[skip:]
        if type(raw) is str:
            if raw[:1] in _NOT_A_NUMBER_START:
                continue
            try:
                value: float | None = float(raw)
            except ValueError:
                continue
        else:
            value = _number(raw)
        if value is None or not isfinite(value):
            continue
        slot = _NAMED.get(name)
        if slot is None:
            other[name if len(name) <= _NAME else cut(name, _NAME)] = value
        elif named is None:
            named = [None, None, None, None]
            named[slot] = value
        else:
            named[slot] = value
    if len(other) > _METRICS:
        other = dict(islice(other.items(), _METRICS))
    if named is None:
        return FireworksMetrics(other=other) if other else NO_METRICS
    prompt, cached = _whole(named[0]), _whole(named[1])
    ttft, processing = named[2], named[3]
    if ttft is not None and not abs(ttft) < _LIMIT:
        ttft = None  # a time no real response has (Rule 5)
    if processing is not None and not abs(processing) < _LIMIT:
        processing = None
    if prompt is None and cached is None and ttft is None and processing is None and not other:
        return NO_METRICS
    return FireworksMetrics(prompt, cached, ttft, processing, other)


def fireworks_metrics(headers: Mapping[str, str]) -> FireworksMetrics:
    """Numeric ``fireworks-*`` headers (names already lower-cased); non-numeric values are ignored."""
    return _metrics(headers.items(), prefixed=True)


def perf_metrics(obj: object) -> FireworksMetrics:
    """A ``perf_metrics`` object (sent when the client asked ``perf_metrics_in_response: true``)."""
    if not isinstance(obj, dict):
        return NO_METRICS
    return _metrics(islice(((str(name).removeprefix(_PREFIX), value) for name, value in obj.items()), _ITEMS))
