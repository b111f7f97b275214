"""`meter serve --server granian`: the limits granian's HTTP/1 settings can carry
(meter.serving.options.granian_options), on a real process. What granian cannot enforce is documented
there and in docs/security.md; these tests pin what it does."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.wire import Wire, not_before, request
from tests.support.processes import Process, free_port, meter_process


@pytest.fixture(scope="module")
def granian_meter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    tmp: Path = tmp_path_factory.mktemp("granian")
    env = {"METER_CLIENT_HEADER_TIMEOUT": "0.5", "METER_MAX_REQUEST_HEAD_BYTES": "16384"}
    upstream = f"http://127.0.0.1:{free_port()}"  # never reached: these requests end at the edge
    database = f"sqlite:///{tmp / 'meter.db'}"
    with meter_process(tmp, upstream, database, "--server", "granian", env=env) as meter:
        yield meter


def test_granian_answers_an_oversized_head_431(granian_meter):
    client = Wire.open("127.0.0.1", granian_meter.port)
    client.send(request("/healthz", b"x-padding: " + b"a" * 20_000))
    answer = client.response()
    assert answer.status == 431  # hyper's answer: an empty body, not the OpenAI shape
    within = Wire.open("127.0.0.1", granian_meter.port)
    within.send(request("/healthz", b"x-padding: " + b"a" * 12_000))
    assert within.response().status == 200


def test_granian_closes_a_head_that_never_finishes_at_the_deadline(granian_meter):
    client = Wire.open("127.0.0.1", granian_meter.port)
    start = time.monotonic()
    client.send(b"GET /healthz HTTP/1.1\r\nhost: meter\r\nx-unfinished: ")
    assert client.closed() == b""  # no 408: hyper closes
    assert not_before(0.5, start)


def test_granian_closes_an_idle_keep_alive_connection_at_the_head_deadline(granian_meter):
    client = Wire.open("127.0.0.1", granian_meter.port)
    client.send(request())
    assert client.response().status == 200
    start = time.monotonic()
    assert client.closed() == b""
    assert not_before(0.5, start)
