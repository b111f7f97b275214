"""The request log: one JSON (or text) line per request, never a key or content, off the request path."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from meter.app import create_app
from meter.records import Outcome, UsageSource
from meter.settings import load_settings
from meter.sinks.prometheus import ProxyMetrics
from meter.sinks.requestlog import (
    JSON_ATTRIBUTE,
    RequestLog,
    configure_logging,
    format_json,
    format_text,
    resolve_format,
)
from meter.sinks.tracing import GenAITracer
from tests.conftest import wait_for
from tests.conftest_db import make_record
from tests.support.processes import meter_process
from tests.support.serve import serve_in_thread

KEY = "fw-log-SECRET-key-0123456789-abcd"
PROMPT = "wombat pangolin axolotl"


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(record.getMessage())


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, Capture]]:
    logger = logging.getLogger("meter.requests.test")
    handler = Capture()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


def _full_record():
    return make_record(
        event_id="0192a0b1c2d3e4f5a6b7c8d9e0f1a2b3",
        started_at=datetime(2026, 11, 1, 12, 30, 45, 123456, tzinfo=UTC),
        key_fingerprint="ab" * 32,
        key_suffix="...abcd",
        requested_model="m-a",
        response_model="accounts/x/m-a",
        request_id="req-42",
        stream=True,
        status_code=200,
        prompt_tokens=12,
        completion_tokens=4,
        cached_tokens=2,
        total_tokens=16,
        duration_ms=1234.5678,
        ttft_ms=45.678,
        overhead_ms=0.23456,
    )


def test_json_line_holds_the_request_fields():
    line = json.loads(format_json(_full_record()))
    assert line == {
        "ts": "2026-11-01T12:30:45.123Z",
        "level": "info",
        "logger": "meter.requests",
        "event": "request",
        "event_id": "0192a0b1c2d3e4f5a6b7c8d9e0f1a2b3",
        "request_id": "req-42",
        "trace_id": None,
        "team": "",
        "key_fingerprint": "ab" * 32,
        "key_suffix": "...abcd",
        "method": "POST",
        "endpoint": "/v1/chat/completions",
        "requested_model": "m-a",
        "response_model": "accounts/x/m-a",
        "stream": True,
        "status_code": 200,
        "outcome": "ok",
        "usage_source": "reported",
        "prompt_tokens": 12,
        "completion_tokens": 4,
        "cached_tokens": 2,
        "reasoning_tokens": None,
        "total_tokens": 16,
        "duration_ms": 1234.6,
        "ttft_ms": 45.7,
        "overhead_ms": 0.235,
        "error_type": None,
        "error": None,
    }


def test_text_line_is_for_a_terminal():
    assert format_text(_full_record()) == (
        "200 POST /v1/chat/completions model=m-a team=- key=...abcd tokens=12+4 dur=1234.6ms "
        "ttft=45.7ms overhead=0.23ms id=0192a0b1c2d3e4f5a6b7c8d9e0f1a2b3 req=req-42"
    )
    failed = make_record(
        status_code=499,
        outcome=Outcome.ABORTED,
        usage_source=UsageSource.ESTIMATED,
        prompt_tokens=3,
        duration_ms=5.0,
    )
    assert "tokens=3+? (estimated)" in format_text(failed)
    assert "error=aborted" in format_text(failed)


def test_lines_reach_the_logger_in_order_and_close_drains(capture):
    logger, handler = capture
    log = RequestLog(logger, "json")
    records = [make_record(requested_model=f"m-{i}") for i in range(50)]
    for record in records:
        log(record)
    log.close()
    assert [json.loads(line)["event_id"] for line in handler.lines] == [r.event_id for r in records]
    assert all(getattr(r, JSON_ATTRIBUTE) for r in handler.records)
    assert all(r.levelno == logging.INFO for r in handler.records)


def test_nothing_is_built_above_info(capture):
    logger, handler = capture
    logger.setLevel(logging.WARNING)
    log = RequestLog(logger, "text")
    log(_full_record())
    log.close()
    assert handler.lines == []


def test_a_full_queue_drops_lines_and_counts_them(capture):
    logger, _ = capture
    entered, release = threading.Event(), threading.Event()

    class Blocking(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            entered.set()
            release.wait(10)

    logger.addHandler(Blocking())
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, process_metrics=False)
    log = RequestLog(logger, "json", max_queue=2, on_drop=metrics.telemetry_dropped)
    log(_full_record())
    assert entered.wait(10)  # the writer thread is stuck in a slow handler
    for _ in range(10):
        log(_full_record())  # two wait in the queue, eight are dropped: the caller never blocks
    dropped = {"signal": "logs", "reason": "queue_full"}
    assert registry.get_sample_value("meter_telemetry_dropped_total", dropped) == 8
    release.set()
    log.close()


def test_resolve_format():
    assert resolve_format("json") == "json" and resolve_format("text") == "text"
    assert resolve_format("auto", io.StringIO()) == "json"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Terminal()) == "text"


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_json_logging_makes_every_line_json(root_logging):
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    logging.getLogger("meter.somewhere").warning("disk %s", "full")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("meter").exception("failed")
    log = RequestLog(logging.getLogger("meter.requests"), "json")
    log(_full_record())
    log.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["level"] == "warning" and lines[0]["message"] == "disk full"
    assert lines[0]["logger"] == "meter.somewhere" and lines[0]["ts"].endswith("Z")
    assert lines[1]["message"] == "failed" and "ValueError: boom" in lines[1]["exception"]
    assert lines[2]["event"] == "request" and lines[2]["request_id"] == "req-42"


def test_text_logging_is_for_people(root_logging):
    stream = io.StringIO()
    configure_logging("info", "text", stream)
    log = RequestLog(logging.getLogger("meter.requests"), "text")
    log(_full_record())
    log.close()
    (line,) = stream.getvalue().splitlines()
    assert " INFO meter.requests: 200 POST /v1/chat/completions model=m-a " in line


# --- through the proxy -----------------------------------------------------------------------------


def test_each_proxied_request_logs_one_line_without_key_or_content(tmp_path: Path, simulator):
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings = load_settings(
        {
            "METER_DATABASE_URL": f"sqlite:///{tmp_path / 'meter.db'}",
            "METER_UPSTREAM_URL": simulator.url,
            "METER_LOG_FORMAT": "json",
        }
    )
    app = create_app(
        settings, registry=CollectorRegistry(), tracer=GenAITracer(provider, upstream_url=simulator.url)
    )
    handler = Capture()
    logger = logging.getLogger("meter.requests")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with serve_in_thread(app, lifespan="on") as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model="m-log", messages=[{"role": "user", "content": PROMPT}], max_tokens=3
            )
            list(
                client.chat.completions.create(
                    model="m-log", messages=[{"role": "user", "content": PROMPT}], max_tokens=3, stream=True
                )
            )
            httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "m-log", "messages": [{"role": "user", "content": PROMPT}]},
                headers={"Authorization": f"Bearer {KEY}", "x-sim-error": "429"},
            )
            assert app.runtime.request_log is not None
            wait_for(lambda: len(handler.lines) == 3, message="3 lines")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(line) for line in handler.lines]
    first, streamed, limited = lines
    assert first["request_id"] == raw.headers["x-request-id"]
    assert first["prompt_tokens"] == raw.parse().usage.prompt_tokens and first["completion_tokens"] == 3
    assert first["key_suffix"] == "...abcd" and len(first["key_fingerprint"]) == 64
    assert streamed["stream"] is True and streamed["ttft_ms"] is not None
    assert limited["status_code"] == 429 and limited["error_type"] == "429"
    trace_ids = {format(span.context.trace_id, "032x") for span in spans.get_finished_spans()}
    assert {line["trace_id"] for line in lines} == trace_ids and len(trace_ids) == 3
    text = "\n".join(handler.lines)
    assert KEY not in text and KEY[:-4] not in text
    for word in PROMPT.split():
        assert word not in text


def test_meter_serve_logs_json_lines_only(tmp_path, simulator):
    process = meter_process(
        tmp_path,
        simulator.url,
        f"sqlite:///{tmp_path / 'meter.db'}",
        "--log-format",
        "json",
        env={"METER_LOG_LEVEL": "info"},
    )
    with process:
        response = httpx.post(
            f"{process.url}/v1/chat/completions",
            json={"model": "m-serve", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert response.status_code == 200

        def request_lines() -> list[dict[str, object]]:
            lines = [json.loads(line) for line in process.log.read_text().splitlines() if line.strip()]
            return [line for line in lines if line.get("event") == "request"]

        (line,) = wait_for(request_lines, message="the request line")
    assert line["requested_model"] == "m-serve" and line["status_code"] == 200
    log = process.log.read_text()
    assert KEY not in log and "pangolin" not in log
    assert any(json.loads(raw).get("logger", "").startswith("uvicorn") for raw in log.splitlines() if raw)
