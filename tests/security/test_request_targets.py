"""Request targets: nothing a client sends steers meter to another host, or out of the upstream's base
path (meter.forward.target). Every refusal is a 400 in the OpenAI error shape, and recorded."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.rawhttp import Canary, raw_request

AUTH = (b"Authorization", b"Bearer fw-targets-test-key-0123456789")


@pytest.fixture
def canary() -> Iterator[Canary]:
    with Canary() as listener:
        yield listener


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_a_target_naming_another_host_is_refused_and_recorded(start_meter, simulator, canary, client):
    # The attack of issue #17: with an upstream URL without a path, "*@host:port/x" appended to it made
    # meter connect to host:port (an open proxy and a port scanner), under METER_UNKNOWN_KEYS=reject too.
    meter = start_meter(simulator.url, upstream_client=client, unknown_keys="reject")
    before = len(simulator.sim.received)
    for target in (f"*@127.0.0.1:{canary.port}/x", f"@127.0.0.1:{canary.port}/x", f"127.0.0.1:{canary.port}"):
        response = raw_request(meter.url, target.encode(), headers=[AUTH], body=b"{}")
        if response.status != 400:  # the HTTP server itself may refuse what is not a target at all
            pytest.fail(f"{target}: {response.status} {response.body!r}")
        if response.header(b"content-type") == b"application/json":
            assert response.error()["code"] in ("invalid_request_target", "malformed_request")
    assert canary.connections == 0
    assert len(simulator.sim.received) == before
    rows = [row for row in meter.rows(1, timeout=5) if row["status_code"] == 400]
    assert rows and all(row["outcome"] == "proxy_error" for row in rows)


def test_options_star_gets_a_clean_400_and_a_record(meter, simulator):
    response = raw_request(meter.url, b"*", method=b"OPTIONS", headers=[AUTH])
    assert response.status == 400
    assert response.error()["code"] == "invalid_request_target"
    row = meter.rows(1)[0]
    assert row["status_code"] == 400 and row["outcome"] == "proxy_error" and row["method"] == "OPTIONS"
    assert row["error"].startswith("request target")
    assert len(simulator.sim.received) == 0


@pytest.mark.parametrize(
    "target",
    [
        b"/../v1/accounts/acme/billing",
        b"/%2e%2e/v1/accounts/acme",
        b"/%2E%2e/v1/accounts/acme",
        b"/v1/../../v1/accounts/acme",
        b"/v1/.%2e/.%2E/v1/accounts",
        b"/..;/v1/accounts/acme",
        b"/v1%2F..%2F..%2Fv1/accounts",
        b"/v1%252F..%252F..%252Fv1/accounts",
        b"/v1\\..\\..\\v1/accounts",
        b"/v1%5C..%5C..%5Cv1/accounts",
        b"/./v1/chat/completions",
    ],
)
def test_paths_that_could_leave_the_base_are_refused(start_meter, simulator, target):
    # A virtual key's team credential goes out with every forwarded request: with the Fireworks base
    # (.../inference) such paths reached the account API outside the inference API.
    meter = start_meter(f"{simulator.url}/inference")
    response = raw_request(meter.url, target, headers=[AUTH], body=b"{}")
    assert response.status == 400, response.body
    assert response.error()["code"] == "invalid_request_target"
    assert len(simulator.sim.received) == 0
    row = meter.rows(1)[0]
    assert row["status_code"] == 400 and row["outcome"] == "proxy_error"


def test_paths_under_the_base_keep_their_encoding(start_meter, scripted):
    upstream, server = scripted
    meter = start_meter(f"{server.url}/inference")
    for target in (
        b"/v1/models/accounts%2Ffireworks%2Fmodels%2Fllama",
        b"/v1/a.b/c...d?x=%2e%2e&y=..",
        b"/v1/x;y=1",
    ):
        response = raw_request(meter.url, target, method=b"GET", headers=[AUTH])
        assert response.status == 200
        path, _, query = target.partition(b"?")
        assert upstream.received[-1].raw_path == b"/inference" + path
        assert upstream.received[-1].query_string == query


targets = st.lists(
    st.sampled_from(
        [
            "/",
            "//",
            ".",
            "..",
            "%2e",
            "%2E",
            "%2f",
            "%2F",
            "%5c",
            "\\",
            "@",
            "*",
            ":",
            ";",
            "?",
            "#",
            "%25",
            "v1",
            "chat",
            "127.0.0.1",
            "{canary}",
            "http:",
            "localhost",
            "%40",
            "%3a",
            "x",
        ]
    ),
    min_size=1,
    max_size=12,
).map("".join)


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_no_target_reaches_another_host_or_leaves_the_base(start_meter, simulator, canary, client):
    """Property (hypothesis): whatever the target, the canary listener on another port is never
    contacted, and whatever reaches the upstream is under its base path with no dot segment."""
    meter = start_meter(f"{simulator.url}/inference", upstream_client=client)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(target=targets)
    def check(target: str) -> None:
        raw = target.replace("{canary}", f"127.0.0.1:{canary.port}").encode()
        try:
            response = raw_request(meter.url, raw, method=b"GET", headers=[AUTH], timeout=5)
        except (ConnectionError, IndexError, ValueError):
            return  # the HTTP server hung up on a request line it could not parse: nothing forwarded
        assert response.status in (200, 400, 404, 405), (raw, response.status)

    check()
    assert canary.connections == 0
    for request in list(simulator.sim.received):
        assert request.path.startswith("/inference/"), request.path
        decoded = unquote(unquote(request.path))
        assert not any(part in (".", "..") for part in decoded.replace("\\", "/").split("/")), request.path
