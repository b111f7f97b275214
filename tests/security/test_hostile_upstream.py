"""A hostile upstream (issue #17): whatever it sends, the client gets exactly its bytes (or meter's
documented error), meter records the exchange exactly once, counts what it could not read, and stays
responsive. Found against the main of 2026-12-06: a gzip event stream inflating to 64 MiB of blank
lines held meter's event loop for 2.7 s (/healthz waited that long)."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter.bounds import MARK
from meter.records import UsageSource
from meter.tap.fireworks_headers import fireworks_metrics, perf_metrics
from meter.tap.observer import DecodeBudget, Observation, ResponseObserver
from meter.tap.sse import SSEDecoder
from meter.tap.usage import tail_members
from tests.conftest import MeterHandle
from tests.support.hostile_upstream import HostileUpstream, MiB, Reply, chunked, gzip_pieces, head

AUTH = {"Authorization": "Bearer fw-hostile-upstream-0123456789"}
CHAT = "/v1/chat/completions"
SSE = {"content-type": "text/event-stream"}
JSON = {"content-type": "application/json"}
CLIENTS = ["aiohttp", "httpx"]


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"  # json: any integer


def content(text: str, index: int = 0) -> bytes:
    return event({"id": "c1", "model": "m", "choices": [{"index": index, "delta": {"content": text}}]})


USAGE = event(
    {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
)
DONE = b"data: [DONE]\n\n"


# --- the observer's budget, deterministic ------------------------------------------------------------


def observe(
    chunks: list[bytes],
    headers: dict[str, str],
    *,
    endpoint: str = CHAT,
    budget: DecodeBudget = DecodeBudget(),  # noqa: B008
    max_body_bytes: int = 1 << 20,
    aborted: bool = False,
) -> tuple[Observation, list[str]]:
    errors: list[str] = []
    observer = ResponseObserver(
        endpoint,
        status_code=200,
        headers=headers,
        on_error=errors.append,
        budget=budget,
        max_body_bytes=max_body_bytes,
    )
    for i, chunk in enumerate(chunks):
        observer.feed(chunk, float(i))
    return observer.finish(aborted=aborted), errors


GZIP_SSE = {**SSE, "content-encoding": "gzip"}
EVENT = content("abcd" * 50)  # 200 content characters in 278 bytes
EVENTS = [EVENT.replace(b'"id":"c1"', b'"id":"c%d"' % i) for i in range(4000)]  # ids differ: no template


def test_the_observer_reads_at_most_max_bytes_then_stops() -> None:
    data = gzip.compress(b"".join(EVENTS) + USAGE)
    limit = 256 * 1024
    got, errors = observe(
        [data[i : i + 512] for i in range(0, len(data), 512)], GZIP_SSE, budget=DecodeBudget(limit, 1000)
    )
    assert errors == ["decode_budget"]
    # it took no more than limit bytes of events (277-281 bytes each), and stopped within a slice of it
    assert (limit - 64 * 1024) // 281 * 200 <= got.content_chars <= limit // 277 * 200
    assert got.usage_source is UsageSource.ESTIMATED  # the usage at the end was never read


def test_the_observer_reads_at_most_max_ratio_times_what_it_was_fed() -> None:
    data = gzip.compress(b"".join([EVENT] * 20000) + USAGE)  # ~200x: the same event over and over
    ratio = len(b"".join([EVENT] * 20000)) / len(data)
    assert ratio > 100
    got, errors = observe(
        [data[i : i + 512] for i in range(0, len(data), 512)], GZIP_SSE, budget=DecodeBudget(1 << 30, 50)
    )
    assert errors == ["decode_budget"]
    assert got.content_chars <= (50 * len(data) + MiB) // len(EVENT) * 200
    assert got.usage_source is UsageSource.ESTIMATED


def test_a_compressed_stream_faster_than_a_step_is_skimmed_and_its_usage_still_counts() -> None:
    data = gzip.compress(b"".join(EVENTS[:3600]) + USAGE + DONE)  # 0.9 MiB of events in one 12 KiB read
    got, errors = observe([data], GZIP_SSE)
    assert errors == ["decode_budget"]  # counted once
    # one step took 64 KiB of events; finish() inflated the rest without parsing and read its last 8 KiB
    assert 0 < got.content_chars <= (64 + 8) * 1024 // len(EVENT) * 200
    assert (got.usage_source, got.usage.prompt_tokens, got.usage.completion_tokens) == (
        UsageSource.REPORTED,
        5,
        7,
    )


def test_real_streams_in_large_reads_are_read_whole() -> None:
    stream = b"".join(EVENTS[:2000]) + USAGE + DONE
    plain, errors = observe([stream], SSE)
    assert errors == [] and plain.usage.prompt_tokens == 5 and plain.content_chars == 2000 * 200
    for size in (64 * 1024, 4096, 1000):
        split, errors = observe([stream[i : i + size] for i in range(0, len(stream), size)], SSE)
        assert errors == [] and split == plain
    flushed, errors = observe(list(gzip_pieces(e + b"\n\n" for e in stream.split(b"\n\n")[:-1])), GZIP_SSE)
    assert errors == [] and (flushed.usage, flushed.content_chars) == (plain.usage, plain.content_chars)
    zipped = gzip.compress(stream)  # compressed whole (~80x), read so that each read inflates < 64 KiB
    assert len(stream) / len(zipped) * 512 < 64 * 1024
    caught_up, errors = observe([zipped[i : i + 512] for i in range(0, len(zipped), 512)], GZIP_SSE)
    assert errors == [] and (caught_up.usage, caught_up.content_chars) == (plain.usage, plain.content_chars)


@pytest.mark.parametrize(
    ("name", "flood"),
    [
        ("blank lines", b"\n" * 65536),
        ("CR only", b"\r" * 65536),
        ("comments", b":\n" * 32768),
        ("one-byte fields", b"x\n" * 32768),
        ("empty data lines", b"data:\n" * 10923),
        ("tiny events", b"data: {}\n\n" * 6553),
        ("small events", event({"p": "x" * 80}) * 668),  # 98 bytes each: few lines, but each a parse
    ],
)
def test_a_flood_of_lines_or_events_in_one_read_is_past_the_step(name: str, flood: bytes) -> None:
    got, errors = observe([content("hi"), flood, USAGE], {**SSE, "fireworks-prompt-tokens": "9"})
    assert errors == ["decode_budget"], name
    assert (got.content_chars, got.usage_source, got.usage.prompt_tokens) == (2, UsageSource.ESTIMATED, 9)


def test_an_event_that_never_ends_stops_the_reading() -> None:
    endless = [b'data: {"choices":[{"delta":{"content":"'] + [b"x" * 65536] * 20
    got, errors = observe([content("hi"), *endless], SSE)
    assert errors == ["body_too_large"] and got.content_chars == 2
    lines = [(b"data: " + b"x" * 30 + b"\n") * 1400] * 3  # data lines and no blank line to end them
    got, errors = observe([content("hi"), *lines], SSE)
    assert errors == ["body_too_large"] and got.content_chars == 2


def test_an_event_of_too_many_values_is_skipped_and_the_stream_read_on() -> None:
    crowded = b'data: {"choices":[' + b",".join([b"{}"] * 9000) + b"]}\n\n"
    got, errors = observe([content("hi"), crowded, content("yo"), USAGE], SSE)
    assert errors == ["body_too_large"]
    assert (got.content_chars, got.usage.prompt_tokens) == (4, 5)


def test_a_body_too_large_to_parse_whole_is_read_from_its_tail() -> None:
    body = orjson.dumps(
        {
            "object": "list",
            "data": [{"embedding": [0.5] * 1536, "index": i} for i in range(400)],
            "model": "nomic-embed",
            "usage": {"prompt_tokens": 9, "total_tokens": 9},
        }
    )
    assert len(body) > 2 * MiB
    got, errors = observe(
        [body[i : i + 65536] for i in range(0, len(body), 65536)], JSON, endpoint="/v1/embeddings"
    )
    assert errors == []
    assert (got.usage_source, got.usage.prompt_tokens, got.response_model) == (
        UsageSource.REPORTED,
        9,
        "nomic-embed",
    )
    crowded = b'{"choices":[' + b",".join([b"{}"] * 9000) + b'],"usage":{"prompt_tokens":3}}'  # < 1 MiB
    got, errors = observe([crowded], JSON)
    assert errors == [] and got.usage.prompt_tokens == 3


@settings(max_examples=40, deadline=None)
@given(points=st.lists(st.integers(min_value=0), max_size=12))
def test_the_tail_read_does_not_depend_on_how_the_body_is_split(points: list[int]) -> None:
    body = orjson.dumps(
        {
            "id": "x",
            "choices": [{"message": {"content": "w " * 2000}}],
            "model": "m",
            "usage": {"prompt_tokens": 4, "completion_tokens": 2000},
        }
    )
    cuts = sorted({p % (len(body) + 1) for p in points})
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    whole, _ = observe([body], JSON, max_body_bytes=1024)
    assert whole.usage.completion_tokens == 2000 and whole.response_model == "m"
    assert observe(pieces, JSON, max_body_bytes=1024)[0] == whole
    assert observe([bytes([b]) for b in body], JSON, max_body_bytes=1024)[0] == whole
    zipped = gzip.compress(body)
    assert (
        observe([bytes([b]) for b in zipped], {**JSON, "content-encoding": "gzip"}, max_body_bytes=1024)[0]
        == whole
    )


def test_tail_members_takes_only_the_top_level() -> None:
    assert tail_members(b'x": 1, "model": "m", "usage": {"prompt_tokens": 2}}') == {
        "model": "m",
        "usage": {"prompt_tokens": 2},
    }
    assert tail_members(b'"usage": {"prompt_tokens": 2}}, "n": 1}') is None  # nested one level down
    assert tail_members(b'"text": "\\"usage\\": {}"}') is None  # inside a string
    assert tail_members(b"no keys at all") is None


def test_the_decoder_refuses_a_feed_of_too_many_lines() -> None:
    decoder = SSEDecoder(max_lines=100)
    assert len(decoder.feed(b"data: x\n\n" * 50)) == 50 and not decoder.overflowed  # 100 lines
    assert decoder.feed(b"\n" * 200) == [] and decoder.overflowed
    lenient = SSEDecoder(max_lines=100)  # more lines than max_lines is fine at 32 bytes a line or more
    assert len(lenient.feed((b"data: " + b"x" * 100 + b"\n\n") * 100)) == 100 and not lenient.overflowed


# --- values from the upstream are bounded -------------------------------------------------------------


@pytest.mark.parametrize("count", [-1, 1.0, 7.5, True, 10**30, 2**64 - 1, 2**53, "12", None, [3], {"n": 3}])
def test_a_count_that_is_not_a_plain_integer_below_2_53_is_not_reported(count: Any) -> None:
    usage = {"prompt_tokens": count, "completion_tokens": count, "total_tokens": count}
    got, _ = observe([event({"choices": [], "usage": usage})], SSE)
    assert got.usage.prompt_tokens is None and got.usage.total_tokens is None
    got, _ = observe([event({"choices": [], "usage": {**usage, "prompt_tokens": 2**53 - 1}})], SSE)
    assert got.usage.prompt_tokens == 2**53 - 1


def test_strings_and_metrics_are_cut_to_meter_bounds() -> None:
    chunk = {
        "id": "i" * 5000,
        "model": "m" * 5000,
        "choices": [{"index": i, "delta": {}, "finish_reason": "r" * 300} for i in range(200)],
        "perf_metrics": {**{f"metric-{i}": i for i in range(100)}, "x" * 200: 1, "nan": "nan", "big": 1e300},
    }
    error = event({"error": {"message": "e" * 50_000}})
    headers = {
        **SSE,
        **{f"fireworks-h{i}": "1" for i in range(60)},
        "fireworks-inf": "inf",
        "fireworks-nan": "NaN",
    }
    got, _ = observe([event(chunk), error], headers)
    assert got.response_id == "i" * 255 + MARK and got.response_model == "m" * 255 + MARK
    assert len(",".join(got.finish_reasons)) == 256 and got.finish_reasons[0].endswith(MARK)
    assert got.error_message == "e" * 1023 + MARK
    assert len(got.upstream_metrics) == 32 and all(len(name) <= 64 for name in got.upstream_metrics)
    assert not {"nan", "big", "inf"} & set(got.upstream_metrics)
    many = fireworks_metrics({"fireworks-" + "n" * 100: "1", "fireworks-prompt-tokens": "1e30"})
    assert many.prompt_tokens is None and list(many.other) == ["n" * 63 + MARK]
    assert perf_metrics({f"k{i}": i for i in range(10_000)}).other == {f"k{i}": float(i) for i in range(32)}


# --- end to end: meter in front of a hostile upstream --------------------------------------------------


@pytest.fixture
def hostile() -> Iterator[HostileUpstream]:
    with HostileUpstream().running() as upstream:
        yield upstream


def post(meter: MeterHandle, *, stream: bool = True, timeout: float = 30) -> tuple[int, httpx.Headers, bytes]:
    """POST a chat request through meter; the raw (still encoded) bytes it relayed."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("POST", f"{meter.base_url}/chat/completions", json=body, headers=AUTH) as r,
    ):
        return r.status_code, r.headers, b"".join(r.iter_raw())


def observe_errors(meter: MeterHandle, kind: str) -> float | None:
    return meter.app.runtime.registry.get_sample_value("meter_observe_errors_total", {"kind": kind})


class Liveness:
    """Asks meter's /healthz over and over from a thread; the slowest answer while it ran."""

    def __init__(self, meter: MeterHandle) -> None:
        self._url = f"{meter.url}/healthz"
        self._stop = threading.Event()
        self.times: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get(self._url).status_code == 200
                self.times.append(time.monotonic() - started)

    def __enter__(self) -> Liveness:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


SSE_HEAD = [("Content-Type", "text/event-stream"), ("fireworks-prompt-tokens", "7")]
_BOMB: list[bytes] = []


def sse_bomb() -> list[bytes]:
    """One gzip stream: 64 MiB of blank lines in its first ~64 KiB, then 40 more MiB, usage, [DONE]."""
    if not _BOMB:
        _BOMB.extend(gzip_pieces([b"\n" * (64 * MiB), *[b"\n" * MiB] * 40, USAGE, DONE]))
    return _BOMB


@pytest.mark.parametrize("client", CLIENTS)
def test_a_gzip_bomb_is_relayed_unchanged_while_meter_stays_responsive(start_meter, hostile, client):
    bomb = sse_bomb()
    hostile.reply = Reply(head(200, [*SSE_HEAD, ("Content-Encoding", "gzip")]), chunked(bomb), pace=0.005)
    meter = start_meter(hostile.url, upstream_client=client)
    with Liveness(meter) as live:
        status, headers, relayed = post(meter)
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert relayed == b"".join(bomb)  # every byte, still compressed
    assert len(live.times) >= 5 and max(live.times) < 0.5, live.times  # was 2.7 s
    row = meter.rows(1)[0]
    assert (row["outcome"], row["usage_source"], row["prompt_tokens"]) == ("ok", "reported", 7)  # the header
    assert observe_errors(meter, "decode_budget") == 1
    assert observe_errors(meter, "internal") == 0


def test_a_gzip_bomb_json_body_is_relayed_unchanged(start_meter, hostile):
    body = gzip.compress(b" " * (64 * MiB) + b'{"usage": {"prompt_tokens": 1}}')
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("Content-Length", str(len(body))),
    ]
    hostile.reply = Reply(head(200, [*headers, ("fireworks-prompt-tokens", "7")], chunked=False), [body])
    meter = start_meter(hostile.url)
    with Liveness(meter) as live:
        status, _, relayed = post(meter, stream=False)
    assert status == 200 and relayed == body
    assert max(live.times, default=0) < 0.5
    row = meter.rows(1)[0]
    assert (row["outcome"], row["usage_source"], row["prompt_tokens"]) == ("ok", "reported", 7)
    assert observe_errors(meter, "decode_budget") == 1


@pytest.mark.parametrize(
    ("flood", "kind"),
    [
        (b"\n" * (8 * MiB), "decode_budget"),
        (b": keep-alive\n" * (MiB // 2), "decode_budget"),
        (
            b'data: {"choices":[{"delta":{"content":"' + b"x" * (8 * MiB),
            "body_too_large",
        ),  # a line without end
    ],
    ids=["blank lines", "comments", "a giant line"],
)
def test_a_flood_is_relayed_unchanged_and_counted(start_meter, hostile, flood, kind):
    pieces = [content("hi"), *(flood[i : i + MiB] for i in range(0, len(flood), MiB)), b"\n\n", USAGE, DONE]
    hostile.reply = Reply(head(200, SSE_HEAD), chunked(pieces))
    meter = start_meter(hostile.url)
    status, _, relayed = post(meter)
    assert status == 200 and relayed == b"".join(pieces)
    row = meter.rows(1)[0]
    assert (row["outcome"], row["usage_source"], row["completion_tokens"]) == ("ok", "estimated", 1)
    assert observe_errors(meter, kind) == 1


def test_a_huge_json_body_still_has_its_usage_counted(start_meter, hostile):
    embedding = b'{"object":"embedding","index":0,"embedding":[' + b",".join([b"0.0123"] * 1536) + b"]}"
    body = (
        b'{"object":"list","data":[' + b",".join([embedding] * 2000) + b"],"
        b'"model":"nomic-ai/nomic-embed-text-v1.5","usage":{"prompt_tokens":4242,"total_tokens":4242}}'
    )
    assert len(body) > 20 * MiB
    hostile.reply = Reply(
        head(200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], chunked=False),
        [body],
    )
    meter = start_meter(hostile.url)
    status, _, relayed = post(meter, stream=False)
    assert status == 200 and relayed == body
    row = meter.rows(1)[0]
    assert (row["outcome"], row["usage_source"], row["prompt_tokens"]) == ("ok", "reported", 4242)
    assert row["response_model"] == "nomic-ai/nomic-embed-text-v1.5"


def test_malformed_events_never_disturb_the_relayed_bytes(start_meter, hostile):
    pieces = [
        content("ab"),
        b"data: {not json\n\n",
        b"data: [1, 2, 3]\n\n",
        b'data: "a string"\n\n',
        b'data: {"choices":[{"delta":{"content":"a\x00b"}}]}\n\n',  # a raw NUL: not JSON
        b'data: {"choices":[{"delta":{"content":"\xff\xfe"}}]}\n\n',  # invalid UTF-8: replaced, 2 chars
        b'event: error\ndata: ["odd"]\n\n',
        b'event: error\ndata: {"error": [1, {"message": 2}]}\n\n',
        b"data: " + b"[" * 5000 + b"\n\n",  # deeper than any parser goes
        b'data: {"choices": {"0": 1}, "usage": "many"}\n\n',
        USAGE,
        DONE,
    ]
    hostile.reply = Reply(head(200, SSE_HEAD), chunked(pieces))
    meter = start_meter(hostile.url)
    status, _, relayed = post(meter)
    assert status == 200 and relayed == b"".join(pieces)
    row = meter.rows(1)[0]
    assert (row["usage_source"], row["prompt_tokens"], row["completion_tokens"]) == ("reported", 5, 7)
    assert row["outcome"] == "upstream_error" and row["error"] == "error"  # the error event's odd shape
    assert observe_errors(meter, "json") == 6
    assert observe_errors(meter, "internal") == 0


def test_cr_only_line_endings_are_read(start_meter, hostile):
    pieces = [p.replace(b"\n", b"\r") for p in (content("abc"), USAGE, DONE)]
    hostile.reply = Reply(head(200, SSE_HEAD), chunked(pieces))
    meter = start_meter(hostile.url)
    assert post(meter)[2] == b"".join(pieces)
    row = meter.rows(1)[0]
    assert (row["usage_source"], row["prompt_tokens"], row["completion_tokens"]) == ("reported", 5, 7)
    assert observe_errors(meter, "decode_budget") == 0  # every kind is there from the start


def test_absurd_values_are_recorded_bounded(start_meter, hostile):
    pieces = [
        event(
            {
                "id": "i" * 10_000,
                "model": "m" * 10_000,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "f" * 10_000}],
                "usage": {"prompt_tokens": 2**64 - 1, "completion_tokens": -1, "total_tokens": 10**30},
            }
        ),
        content("ab"),
        DONE,
    ]
    headers = [
        *SSE_HEAD[:1],
        *((f"fireworks-m{i}", "1") for i in range(60)),
        ("fireworks-x", "nan"),
        ("fireworks-y", "1e400"),
    ]
    hostile.reply = Reply(head(200, headers), chunked(pieces))
    meter = start_meter(hostile.url)
    assert post(meter)[2] == b"".join(pieces)
    row = meter.rows(1)[0]  # the database took it (10**30 tokens would not fit a BIGINT)
    assert (row["usage_source"], row["completion_tokens"]) == ("estimated", 1)  # from the 2 chars relayed
    assert row["prompt_tokens"] == 1  # the request's estimate: 2**64 - 1 is no count (nor fits a BIGINT)
    assert (len(row["response_id"]), len(row["response_model"]), len(row["finish_reason"])) == (256, 256, 256)
    assert len(orjson.loads(row["upstream_metrics"])) == 32


# --- heads too large, answers that never come, streams that stop halfway ------------------------------


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    "bad_head",
    [
        head(200, [("Content-Type", "application/json"), ("x-big", "v" * 16_384)]),
        head(200, [("Content-Type", "application/json"), *((f"x-h{i}", "v") for i in range(200))]),
        b"HTTP/1.1 200 " + b"K" * 16_384 + b"\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["a huge header", "too many headers", "a huge status line"],
)
def test_a_head_beyond_the_limits_is_a_502_and_one_record(start_meter, hostile, client, bad_head):
    hostile.reply = Reply(bad_head, chunked([b"{}"]))
    meter = start_meter(hostile.url, upstream_client=client)
    response = httpx.post(f"{meter.base_url}/chat/completions", json={"model": "m"}, headers=AUTH, timeout=30)
    assert_openai_error(response, 502, "upstream_protocol_error")
    row = meter.rows(1)[0]
    assert (row["outcome"], row["status_code"], row["requested_model"]) == ("proxy_error", 502, "m")


@pytest.mark.parametrize("client", CLIENTS)
def test_an_upstream_that_never_answers_is_a_504_after_the_read_timeout(start_meter, hostile, client):
    hostile.reply = Reply(end="hang")
    meter = start_meter(hostile.url, upstream_client=client, upstream_read_timeout=0.3)
    started = time.monotonic()
    response = httpx.post(f"{meter.base_url}/chat/completions", json={"model": "m"}, headers=AUTH, timeout=30)
    assert 0.25 < time.monotonic() - started < 10
    assert_openai_error(response, 504, "upstream_timeout")
    row = meter.rows(1)[0]
    assert (row["outcome"], row["status_code"]) == ("proxy_error", 504)
    assert hostile.hung_up.wait(10)  # meter let go of the connection


def read_cut_stream(meter: MeterHandle) -> tuple[bytes, Exception | None]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    received = b""
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{meter.base_url}/chat/completions", json=body, headers=AUTH) as r,
    ):
        assert r.status_code == 200
        try:
            for piece in r.iter_raw():
                received += piece
        except httpx.HTTPError as exc:
            return received, exc
    return received, None


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("how", ["closed", "silent"])
def test_a_stream_that_stops_halfway_cuts_the_client_and_records_what_was_seen(
    start_meter, hostile, client, how
):
    pieces = [content("abcd"), content("efgh")]
    hostile.reply = Reply(
        head(200, SSE_HEAD), chunked(pieces, last=False), end="close" if how == "closed" else "hang"
    )
    meter = start_meter(hostile.url, upstream_client=client, upstream_read_timeout=0.3)
    received, error = read_cut_stream(meter)
    assert received == b"".join(pieces)
    assert isinstance(error, httpx.RemoteProtocolError)  # the connection was cut: no clean end
    row = meter.rows(1)[0]
    assert (row["outcome"], row["status_code"], row["usage_source"]) == ("proxy_error", 200, "estimated")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (7, 2)  # the header's, and 8 chars relayed
    assert ("stopped sending" if how == "silent" else "broke") in row["error"]


def test_the_budget_settings_reach_the_observer(start_meter, hostile):
    pieces = [*EVENTS[:1000], USAGE, DONE]  # 278 KB no template takes: each event parsed the long way
    hostile.reply = Reply(head(200, SSE_HEAD), chunked(pieces))
    meter = start_meter(hostile.url, observe_max_bytes="65536", observe_max_ratio="2")
    assert post(meter)[2] == b"".join(pieces)
    row = meter.rows(1)[0]
    assert (row["outcome"], row["usage_source"]) == ("ok", "estimated")  # the usage came past the budget
    assert observe_errors(meter, "decode_budget") == 1
    assert meter.app.runtime.settings.observe_max_ratio == 2
