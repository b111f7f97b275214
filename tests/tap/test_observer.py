"""The tap: recorded upstream traffic in, the exact Observation out, however the bytes are split."""

from __future__ import annotations

import ast
import dataclasses
import gzip
import subprocess
import sys
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter.records import Usage, UsageSource
from meter.tap.observer import Observation, ResponseObserver
from tests.support.paths import FIXTURES, ROOT

SSE = {"content-type": "text/event-stream; charset=utf-8"}
JSON = {"content-type": "application/json"}
CHAT = "/v1/chat/completions"


def observe(
    endpoint: str,
    chunks: list[bytes],
    headers: dict[str, str],
    *,
    status_code: int = 200,
    aborted: bool = False,
    prompt_tokens_estimate: int | None = None,
    max_body_bytes: int = 16 * 1024 * 1024,
    errors: list[str] | None = None,
) -> Observation:
    observer = ResponseObserver(
        endpoint,
        status_code=status_code,
        headers=headers,
        prompt_tokens_estimate=prompt_tokens_estimate,
        on_error=None if errors is None else errors.append,
        max_body_bytes=max_body_bytes,
    )
    for i, chunk in enumerate(chunks):
        observer.feed(chunk, float(i))
    return observer.finish(aborted=aborted)


def untimed(observation: Observation) -> Observation:
    return dataclasses.replace(observation, first_content_at=None)


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def reported(
    usage: Usage,
    *,
    chars: int,
    rid: str | None,
    model: str | None,
    finish: tuple[str, ...] = (),
    streamed: bool,
) -> Observation:
    return Observation(
        usage=usage,
        usage_source=UsageSource.REPORTED,
        response_id=rid,
        response_model=model,
        finish_reasons=finish,
        content_chars=chars,
        streamed=streamed,
    )


FW_8B = "accounts/fireworks/models/llama-v3p1-8b-instruct"

# (fixture, endpoint, headers, expected Observation without timing). The numbers are read off the files.
CASES: list[tuple[str, str, dict[str, str], Observation]] = [
    (
        "chat_fireworks_usage_on_finish.sse",
        CHAT,
        {**SSE, "fireworks-server-time-to-first-token": "0.0731", "fireworks-cached-prompt-tokens": "0"},
        dataclasses.replace(
            reported(
                Usage(19, 9, 0, None, 28),
                chars=32,
                rid="9f1c2b7e-5a4d-4e0a-8a52-3c6a8d1e2f10",
                model=FW_8B,
                finish=("stop",),
                streamed=True,
            ),
            server_ttft_s=0.0731,
        ),
    ),
    (
        "chat_openai_usage_separate.sse",
        CHAT,
        SSE,
        reported(
            Usage(14, 5, 0, 0, 19),
            chars=16,
            rid="chatcmpl-AXq3k9fZ2bW1sYx7T0mPqR4vLc8Ne",
            model="gpt-4o-mini-2024-07-18",
            finish=("stop",),
            streamed=True,
        ),
    ),
    (
        "chat_crlf_keepalive.sse",
        "/inference/v1/chat/completions",
        SSE,
        reported(
            Usage(8, 3, None, None, 11),
            chars=9,
            rid="e1d2c3b4-a5f6-4789-8a0b-1c2d3e4f5a6b",
            model=FW_8B,
            finish=("stop",),
            streamed=True,
        ),
    ),
    (
        "chat_n2_repeated_usage.sse",
        CHAT,
        SSE,
        reported(
            Usage(12, 14, None, None, 26),  # not 24/28/52: the repeated usage is counted once
            chars=25,
            rid="2c7e9a1b-4f3d-4b8e-a0c5-6d9e1f2a3b47",
            model=FW_8B,
            finish=("stop", "length"),  # index order, though choice 1 finished first
            streamed=True,
        ),
    ),
    (
        "chat_perf_metrics.sse",
        CHAT,
        {
            **SSE,
            "fireworks-server-time-to-first-token": "0.0900",
            "fireworks-speculation-acceptance": "0.5",
            "fireworks-num-concurrent-requests": "3",
        },
        Observation(
            usage=Usage(26, 7, 16, None, 33),  # cached from perf_metrics: the usage object lacks it
            usage_source=UsageSource.REPORTED,
            response_id="7a3f5c9e-1d2b-4e6f-8a0c-b4d6e8f0a2c1",
            response_model="accounts/fireworks/models/llama-v3p3-70b-instruct",
            finish_reasons=("stop",),
            server_ttft_s=0.0852,  # perf_metrics over the header's 0.0900
            server_processing_s=0.4123,
            upstream_metrics={
                "speculation-generated-tokens": 12.0,
                "speculation-acceptance": 0.75,
                "tokenizer-queue-duration": 0.0004,
                "prefill-duration": 0.0311,
                "num-concurrent-requests": 3.0,
            },
            content_chars=21,
            streamed=True,
        ),
    ),
    (
        "chat_reasoning_tools_cached.sse",
        CHAT,
        SSE,
        reported(
            Usage(1200, 45, 128, 20, 1245),
            chars=13 + 12 + 16,  # reasoning + content + tool arguments
            rid="c4e8a2f6-0b9d-4c1e-9f7a-3d5b8e2c6a90",
            model="accounts/fireworks/models/deepseek-r1",
            finish=("tool_calls",),
            streamed=True,
        ),
    ),
    (
        "completions_stream.sse",
        "/v1/completions",
        SSE,
        reported(
            Usage(3, 4, None, None, 7),
            chars=16,
            rid="cmpl-3b9f1e7a5c2d4068",
            model="accounts/fireworks/models/llama-v3p1-8b",
            finish=("length",),
            streamed=True,
        ),
    ),
    (
        "responses_stream.sse",
        "/v1/responses",
        SSE,
        reported(
            Usage(36, 4, 0, 0, 40),
            chars=9,  # the deltas only; *.done events repeat the text
            rid="resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
            model="gpt-4.1-mini-2025-04-14",
            finish=("completed",),
            streamed=True,
        ),
    ),
    (
        "responses_stream_fireworks_incomplete.sse",
        "/inference/v1/responses",
        SSE,
        reported(
            Usage(50, 6, None, None, 56),
            chars=3 + 12,
            rid="resp_fw_1b7c9e3a5d",
            model="accounts/fireworks/models/qwen3-235b-a22b",
            finish=("max_output_tokens",),
            streamed=True,
        ),
    ),
    (
        "chat.json",
        CHAT,
        {
            **JSON,
            "fireworks-prompt-tokens": "23",
            "fireworks-cached-prompt-tokens": "16",
            "fireworks-server-time-to-first-token": "0.1214",
            "fireworks-server-processing-time": "0.2458",
            "fireworks-deployment": "accounts/fireworks/deployments/3f9a2c1b",
            "fireworks-prefill-duration": "0.0503",
        },
        Observation(
            usage=Usage(23, 9, 16, None, 32),  # cached from the header fills what the body lacks
            usage_source=UsageSource.REPORTED,
            response_id="3d8f2a6c-7b1e-4f90-a5c3-9e2d4b6f8a01",
            response_model=FW_8B,
            finish_reasons=("stop",),
            server_ttft_s=0.1214,
            server_processing_s=0.2458,
            upstream_metrics={"prefill-duration": 0.0503},
            content_chars=32,
        ),
    ),
    (
        "chat_n2_reasoning_perf.json",
        CHAT,
        JSON,
        Observation(
            usage=Usage(310, 42, 256, 30, 352),
            usage_source=UsageSource.REPORTED,
            response_id="8b2e4d6f-0a1c-4e3b-9d5f-7a9c1e3b5d72",
            response_model="accounts/fireworks/models/deepseek-r1",
            finish_reasons=("tool_calls", "length"),
            server_ttft_s=0.2031,
            server_processing_s=1.0457,
            upstream_metrics={"prefill-duration": 0.151},
            content_chars=13 + 5 + 5,
        ),
    ),
    (
        "completions.json",
        "/v1/completions",
        JSON,
        reported(
            Usage(5, 16, None, None, 21),
            chars=25,
            rid="cmpl-9c1e5a7b3d2f4e60",
            model="accounts/fireworks/models/llama-v3p1-8b",
            finish=("length",),
            streamed=False,
        ),
    ),
    (
        "embeddings.json",
        "/v1/embeddings",
        JSON,
        reported(
            Usage(8, None, None, None, 8),
            chars=0,
            rid=None,
            model="nomic-ai/nomic-embed-text-v1.5",
            streamed=False,
        ),
    ),
    (
        "responses.json",
        "/v1/responses",
        JSON,
        reported(
            Usage(320, 58, 256, 32, 378),
            chars=19 + 15 + 14,  # reasoning summary + function arguments + output text
            rid="resp_6820f382ee1c8191bc096bee70894d040ac5ba57aafcbac7",
            model="accounts/fireworks/models/qwen3-235b-a22b",
            finish=("completed",),
            streamed=False,
        ),
    ),
]

IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("name", "endpoint", "headers", "expected"), CASES, ids=IDS)
def test_recorded_traffic(name: str, endpoint: str, headers: dict[str, str], expected: Observation) -> None:
    data = (FIXTURES / name).read_bytes()
    errors: list[str] = []
    whole = observe(endpoint, [data], headers, errors=errors)
    assert untimed(whole) == expected
    assert errors == []
    if expected.streamed:
        assert whole.first_content_at == 0.0  # the only feed
    else:
        assert whole.first_content_at is None  # TTFT is a streaming notion


@pytest.mark.parametrize(("name", "endpoint", "headers", "expected"), CASES, ids=IDS)
def test_recorded_traffic_byte_at_a_time(
    name: str, endpoint: str, headers: dict[str, str], expected: Observation
) -> None:
    data = (FIXTURES / name).read_bytes()
    assert untimed(observe(endpoint, [data[i : i + 1] for i in range(len(data))], headers)) == expected


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), points=st.lists(st.integers(min_value=0), max_size=40))
def test_recorded_traffic_random_splits(
    case: tuple[str, str, dict[str, str], Observation], points: list[int]
) -> None:
    name, endpoint, headers, expected = case
    data = (FIXTURES / name).read_bytes()
    assert untimed(observe(endpoint, split_at(data, points), headers)) == expected


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(CASES), points=st.lists(st.integers(min_value=0), max_size=20))
def test_gzip_bodies_match_plain(
    case: tuple[str, str, dict[str, str], Observation], points: list[int]
) -> None:
    name, endpoint, headers, expected = case
    data = gzip.compress((FIXTURES / name).read_bytes())
    errors: list[str] = []
    got = observe(endpoint, split_at(data, points), {**headers, "content-encoding": "gzip"}, errors=errors)
    assert untimed(got) == expected
    assert errors == []


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
@pytest.mark.parametrize("name", ["chat_fireworks_usage_on_finish.sse", "chat.json"])
def test_deflate_zlib_wrapped_and_raw(name: str, wbits: int) -> None:
    compressor = zlib.compressobj(wbits=wbits)
    data = compressor.compress((FIXTURES / name).read_bytes()) + compressor.flush()
    plain_headers = SSE if name.endswith(".sse") else JSON
    plain = observe(CHAT, [(FIXTURES / name).read_bytes()], plain_headers)
    errors: list[str] = []
    one_byte = [data[i : i + 1] for i in range(len(data))]
    got = observe(CHAT, one_byte, {**plain_headers, "content-encoding": "deflate"}, errors=errors)
    assert untimed(got) == untimed(plain)
    assert errors == []


def test_identity_encoding_is_plain() -> None:
    data = (FIXTURES / "chat.json").read_bytes()
    got = observe(CHAT, [data], {**JSON, "content-encoding": "identity"})
    assert got.usage_source is UsageSource.REPORTED
    assert got.usage.total_tokens == 32


def test_gzip_bomb_is_capped() -> None:
    data = gzip.compress(b" " * (8 * 1024 * 1024))  # 8 MiB of nothing in ~8 KiB
    errors: list[str] = []
    got = observe(
        CHAT, [data], {**JSON, "content-encoding": "gzip"}, max_body_bytes=1024 * 1024, errors=errors
    )
    assert errors == ["decode_budget"]  # ~1000x: past the ratio once its first MiB is read
    assert got.usage_source is UsageSource.MISSING


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, br"])
def test_unknown_encoding_falls_back_to_headers(encoding: str) -> None:
    errors: list[str] = []
    headers = {**SSE, "content-encoding": encoding, "fireworks-prompt-tokens": "19"}
    got = observe(CHAT, [b"\x1b\x2c\x00\x00garbage", b"more"], headers, errors=errors)
    assert errors == ["encoding"]  # once, not once per chunk
    assert got.usage_source is UsageSource.REPORTED
    assert got.usage == Usage(prompt_tokens=19)


def gzip_per_event(data: bytes) -> list[bytes]:
    """Gzip as a streaming server does it: one sync flush per event, so each event arrives whole."""
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    chunks = [compressor.compress(e) + compressor.flush(zlib.Z_SYNC_FLUSH) for e in events]
    chunks[-1] += compressor.flush()
    return chunks


def test_gzip_stream_flushed_per_event_has_the_right_first_content_feed() -> None:
    data = (FIXTURES / "chat_fireworks_usage_on_finish.sse").read_bytes()
    got = observe(CHAT, gzip_per_event(data), {**SSE, "content-encoding": "gzip"})
    assert got.first_content_at == 1.0  # feed 0 is the role-only chunk
    assert got.usage == Usage(19, 9, None, None, 28)


def test_corrupt_gzip_is_reported_once_and_keeps_what_came_before() -> None:
    chunks = gzip_per_event((FIXTURES / "chat_fireworks_usage_on_finish.sse").read_bytes())
    errors: list[str] = []
    corrupt = [*chunks[:3], b"\xff" * 50, *chunks[3:]]
    got = observe(CHAT, corrupt, {**SSE, "content-encoding": "gzip"}, errors=errors, aborted=True)
    assert errors == ["encoding"]
    assert got.response_id == "9f1c2b7e-5a4d-4e0a-8a52-3c6a8d1e2f10"  # the first chunks were read
    assert got.content_chars == 6  # "Hello" and "!"
    assert got.usage_source is UsageSource.ESTIMATED


def test_first_content_at_is_the_feed_that_completed_the_first_content_event() -> None:
    data = (FIXTURES / "chat_fireworks_usage_on_finish.sse").read_bytes()
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    # Feed 0 is the role-only chunk; feed 1 ends mid-way through the "Hello" event; feed 2 completes it.
    chunks = [events[0], events[1][:-1], b"\n" + events[2], *events[3:]]
    assert observe(CHAT, chunks, SSE).first_content_at == 2.0


ALL_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if p.suffix in (".sse", ".json"))


def endpoint_for(name: str) -> str:
    for prefix, endpoint in (("responses", "/v1/responses"), ("completions", "/v1/completions")):
        if name.startswith(prefix):
            return endpoint
    return "/v1/embeddings" if name.startswith("embeddings") else CHAT


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_every_fixture_byte_at_a_time_matches_whole(name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    headers = SSE if name.endswith(".sse") else JSON
    status = 400 if name.startswith("error") else 200
    whole = observe(endpoint_for(name), [data], headers, status_code=status, prompt_tokens_estimate=10)
    one_byte = [data[i : i + 1] for i in range(len(data))]
    bytewise = observe(endpoint_for(name), one_byte, headers, status_code=status, prompt_tokens_estimate=10)
    assert untimed(bytewise) == untimed(whole)
    assert whole.usage_source is not UsageSource.MISSING or name.startswith("error")


def test_named_error_event_in_a_chat_stream() -> None:
    data = (
        b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
        b'event: error\ndata: {"error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    got = observe(CHAT, [data], SSE)
    assert (got.stream_error, got.error_message, got.content_chars) == (True, "Overloaded", 2)


def test_unparseable_chunk_is_counted_and_skipped() -> None:
    data = (FIXTURES / "chat_fireworks_usage_on_finish.sse").read_bytes()
    broken = data.replace(b"\n\n", b'\n\ndata: {"id": broken\n\ndata: [1, 2]\n\n', 1)
    errors: list[str] = []
    got = observe(CHAT, [broken], SSE, errors=errors)
    assert errors == ["json", "json"]  # invalid JSON, then valid JSON that is not an object
    assert untimed(got) == reported(
        Usage(19, 9, None, None, 28),
        chars=32,
        rid="9f1c2b7e-5a4d-4e0a-8a52-3c6a8d1e2f10",
        model=FW_8B,
        finish=("stop",),
        streamed=True,
    )


def test_error_mid_stream_is_estimated() -> None:
    data = (FIXTURES / "chat_error_midstream.sse").read_bytes()
    got = observe(CHAT, [data], SSE, prompt_tokens_estimate=40)
    assert untimed(got) == Observation(
        usage=Usage(40, 3, None, None, 43),  # ceil(9 / 4) completion tokens
        usage_source=UsageSource.ESTIMATED,
        response_id="5e0a7c3d-9b1f-4d2e-8c6a-1f4b7e9d2a30",
        response_model="accounts/fireworks/models/llama-v3p1-70b-instruct",
        error_message="Internal server error: generation was interrupted",
        stream_error=True,
        content_chars=9,
        streamed=True,
    )


def test_responses_error_event_and_failed_response() -> None:
    data = (FIXTURES / "responses_stream_error.sse").read_bytes()
    got = observe("/v1/responses", [data], SSE)
    assert untimed(got) == Observation(
        usage=Usage(None, 1, None, None, None),  # no prompt figure at all: total unknown
        usage_source=UsageSource.ESTIMATED,
        response_id="resp_0e4f7a9c2b",
        response_model="accounts/fireworks/models/llama-v3p1-405b-instruct",
        finish_reasons=("failed",),
        error_message="The server had an error while processing your request.",
        stream_error=True,
        content_chars=3,
        streamed=True,
    )


def test_no_usage_stream_is_estimated_from_header_prompt_tokens() -> None:
    data = (FIXTURES / "chat_no_usage.sse").read_bytes()
    got = observe(CHAT, [data], {**SSE, "fireworks-prompt-tokens": "21"}, prompt_tokens_estimate=99)
    assert got.usage_source is UsageSource.ESTIMATED
    assert got.usage == Usage(21, 5, None, None, 26)  # header prompt over the request estimate; ceil(17/4)
    assert got.finish_reasons == ("stop",)
    assert got.content_chars == 17


def test_no_usage_stream_is_estimated_from_request_estimate() -> None:
    data = (FIXTURES / "chat_no_usage.sse").read_bytes()
    got = observe(CHAT, [data], SSE, prompt_tokens_estimate=30)
    assert (got.usage_source, got.usage) == (UsageSource.ESTIMATED, Usage(30, 5, None, None, 35))


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=1))
def test_aborted_stream_is_estimated_and_fragment_is_not_an_error(cut: int) -> None:
    data = (FIXTURES / "chat_fireworks_usage_on_finish.sse").read_bytes()
    usage_at = data.index(b'"usage":{')
    first_content_end = data.index(b'"Hello"') + 100
    cut = first_content_end + cut % (usage_at - first_content_end)  # after "Hello", before the usage
    errors: list[str] = []
    got = observe(CHAT, [data[:cut]], SSE, aborted=True, prompt_tokens_estimate=17, errors=errors)
    assert errors == []
    assert got.usage_source is UsageSource.ESTIMATED
    assert got.usage.prompt_tokens == 17
    assert got.usage.completion_tokens == -(-got.content_chars // 4)
    assert got.usage.total_tokens == 17 + got.usage.completion_tokens
    assert got.content_chars >= 5


def test_aborted_stream_cut_exactly_after_a_complete_line_keeps_that_event() -> None:
    data = (FIXTURES / "chat_fireworks_usage_on_finish.sse").read_bytes()
    cut = data.index(b"\n", data.index(b'"usage":{')) + 1  # the usage line, without its blank line
    got = observe(CHAT, [data[:cut]], SSE, aborted=True)
    assert (got.usage_source, got.usage) == (UsageSource.REPORTED, Usage(19, 9, None, None, 28))


def test_aborted_after_usage_is_reported() -> None:
    data = (FIXTURES / "chat_fireworks_usage_on_finish.sse").read_bytes()
    got = observe(CHAT, [data[: data.index(b"data: [DONE]")]], SSE, aborted=True)
    assert got.usage_source is UsageSource.REPORTED
    assert got.usage == Usage(19, 9, None, None, 28)


def test_aborted_json_body_is_not_a_parse_error() -> None:
    data = (FIXTURES / "chat.json").read_bytes()
    errors: list[str] = []
    got = observe(CHAT, [data[:100]], {**JSON, "fireworks-prompt-tokens": "23"}, aborted=True, errors=errors)
    assert errors == []
    assert (got.usage_source, got.usage) == (UsageSource.REPORTED, Usage(prompt_tokens=23))


def test_header_prompt_tokens_without_content_is_reported_prompt_only() -> None:
    headers = {**SSE, "fireworks-prompt-tokens": "19", "fireworks-cached-prompt-tokens": "8"}
    got = observe(CHAT, [b": ping\n\n"], headers, aborted=True, prompt_tokens_estimate=50)
    assert got.usage_source is UsageSource.REPORTED
    assert got.usage == Usage(19, None, 8, None, None)  # completion unknown, so no total either


def test_nothing_at_all_is_missing_with_none_counts() -> None:
    for headers in (SSE, JSON, {}):
        got = observe(CHAT, [], headers, aborted=True, prompt_tokens_estimate=12)
        assert got.usage_source is UsageSource.MISSING
        assert got.usage == Usage(None, None, None, None, None)
        assert got.content_chars == 0
        assert got.first_content_at is None


def test_upstream_error_body() -> None:
    data = (FIXTURES / "error_400.json").read_bytes()
    errors: list[str] = []
    got = observe(CHAT, [data], JSON, status_code=400, errors=errors)
    assert errors == []
    assert got.usage_source is UsageSource.MISSING
    assert got.error_message == "The prompt is too long: 140000, model maximum context length: 131072"
    assert not got.stream_error


def test_html_error_page_is_ignored_quietly() -> None:
    errors: list[str] = []
    got = observe(
        CHAT,
        [b"<html><body>502 Bad Gateway</body></html>"],
        {"content-type": "text/html"},
        status_code=502,
        errors=errors,
    )
    assert errors == []
    assert got.usage_source is UsageSource.MISSING
    assert got.error_message is None


def test_unlabelled_json_body_is_read() -> None:
    data = (FIXTURES / "completions.json").read_bytes()
    got = observe("/v1/completions", [data], {})
    assert got.usage == Usage(5, 16, None, None, 21)


def test_json_labelled_garbage_is_a_json_error() -> None:
    errors: list[str] = []
    got = observe(CHAT, [b'{"id": "x", "usage": {'], JSON, errors=errors)
    assert errors == ["json"]
    assert got.usage_source is UsageSource.MISSING


def test_binary_body_is_not_read() -> None:
    errors: list[str] = []
    got = observe("/v1/audio/speech", [b"\x00\x01" * 100], {"content-type": "audio/mpeg"}, errors=errors)
    assert errors == []
    assert got.usage_source is UsageSource.MISSING


def test_body_over_the_cap_is_read_from_its_tail() -> None:
    data = (FIXTURES / "chat.json").read_bytes()
    errors: list[str] = []
    headers = {**JSON, "fireworks-prompt-tokens": "23", "fireworks-cached-prompt-tokens": "16"}
    got = observe(CHAT, [data[:150], data[150:]], headers, max_body_bytes=200, errors=errors)
    assert errors == []
    assert (got.usage_source, got.usage) == (UsageSource.REPORTED, Usage(23, 9, 16, None, 32))
    # read from its last "model" key on (the whole tail here): the id before it is not
    assert got.response_id is None
    assert got.response_model == "accounts/fireworks/models/llama-v3p1-8b-instruct"


def test_body_over_the_cap_without_usage_at_its_end_falls_back_to_headers() -> None:
    data = (FIXTURES / "chat.json").read_bytes().replace(b'"usage"', b'"u"').replace(b'"model"', b'"m"')
    errors: list[str] = []
    headers = {**JSON, "fireworks-prompt-tokens": "23", "fireworks-cached-prompt-tokens": "16"}
    got = observe(CHAT, [data[:150], data[150:]], headers, max_body_bytes=200, errors=errors)
    assert errors == ["body_too_large"]
    assert (got.usage_source, got.usage) == (UsageSource.REPORTED, Usage(23, None, 16, None, None))
    assert got.response_id is None


def test_sse_line_over_the_cap_stops_reading() -> None:
    errors: list[str] = []
    chunks = [b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', b"data: " + b"x" * 300, b"y" * 10]
    got = observe(CHAT, chunks, SSE, max_body_bytes=256, errors=errors)
    assert errors == ["body_too_large"]
    assert got.content_chars == 1  # what came before the runaway line still counts
    assert got.usage_source is UsageSource.ESTIMATED


def test_unrecognised_path_streaming_responses_events() -> None:
    data = (FIXTURES / "responses_stream_fireworks_incomplete.sse").read_bytes()
    got = observe("/v2/something", [data], SSE)
    assert got.usage == Usage(50, 6, None, None, 56)
    assert got.content_chars == 15


def test_on_error_that_raises_does_not_escape() -> None:
    def boom(kind: str) -> None:
        raise RuntimeError(kind)

    observer = ResponseObserver(CHAT, status_code=200, headers=SSE, on_error=boom)
    observer.feed(b"data: {nope\n\n", 0.0)
    assert observer.finish().usage_source is UsageSource.MISSING


def test_finish_twice_gives_the_same_answer() -> None:
    data = (FIXTURES / "chat.json").read_bytes()
    observer = ResponseObserver(CHAT, status_code=200, headers=JSON)
    observer.feed(data, 1.0)
    first = observer.finish()
    assert observer.finish() == first
    assert first.usage.total_tokens == 32


def test_headers_are_copied() -> None:
    headers = {**SSE, "fireworks-prompt-tokens": "7"}
    observer = ResponseObserver(CHAT, status_code=200, headers=headers)
    headers["fireworks-prompt-tokens"] = "700"
    assert observer.finish().usage.prompt_tokens == 7


@settings(max_examples=150, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=64) | st.sampled_from([b"data: ", b"\n\n", b"{", b'"usage":', b"\r"])),
    headers=st.sampled_from(
        [SSE, JSON, {}, {**SSE, "content-encoding": "gzip"}, {**JSON, "content-encoding": "deflate"}]
    ),
    endpoint=st.sampled_from([CHAT, "/v1/responses", "/v1/embeddings", "/x"]),
    aborted=st.booleans(),
)
def test_never_raises_on_arbitrary_bytes(
    chunks: list[bytes], headers: dict[str, str], endpoint: str, aborted: bool
) -> None:
    observer = ResponseObserver(
        endpoint, status_code=200, headers=headers, on_error=lambda kind: None, max_body_bytes=512
    )
    for i, chunk in enumerate(chunks):
        observer.feed(chunk, float(i))
    got = observer.finish(aborted=aborted)
    assert got.usage_source in set(UsageSource)


# --- purity --------------------------------------------------------------------------------------------

PURE = [
    "meter/tap/sse.py",
    "meter/tap/usage.py",
    "meter/tap/fireworks_headers.py",
    "meter/tap/estimate.py",
    "meter/tap/templates.py",
    "meter/tap/observer.py",
    "meter/records.py",
]
FORBIDDEN = {"litestar", "httpx", "aiohttp", "sqlalchemy"}


@pytest.mark.parametrize("path", PURE)
def test_pure_modules_import_only_stdlib_orjson_and_meter(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"orjson", "meter"}
    assert imported <= allowed, imported - allowed
    assert not imported & FORBIDDEN


@pytest.mark.integration
def test_importing_the_tap_loads_no_framework() -> None:
    code = (
        "import sys, meter.tap.sse, meter.tap.usage, meter.tap.fireworks_headers, meter.tap.estimate,"
        " meter.tap.templates, meter.tap.observer, meter.records\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("split", [None, 1, 7])
def test_done_is_the_done_event_only(split: int | None) -> None:
    """``done`` turns true on the stream's ``data: [DONE]`` event (whole, or arriving in pieces), and
    not on content that merely contains those characters."""
    tricky = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"data: [DONE]\\n\\n"}}]}\n\n'
    body = tricky + b"data: [DONE]\n\n"
    observer = ResponseObserver(CHAT, status_code=200, headers=SSE)
    pieces = (
        [body[: len(tricky)], body[len(tricky) :]]
        if split is None
        else [body[i : i + split] for i in range(0, len(body), split)]
    )
    seen = 0
    for piece in pieces:
        observer.feed(piece, 0.0)
        seen += len(piece)
        assert observer.done == (seen == len(body)), seen
