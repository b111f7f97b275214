"""Bad input gets a clear error or an unchanged pass-through, and always exactly one record."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

AUTH = {"Authorization": "Bearer fw-bad-input"}


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


def test_invalid_json_is_forwarded_unchanged_and_recorded(meter, simulator):
    body = b'{"model": "m", "messages": [oops'
    response = httpx.post(
        f"{meter.base_url}/chat/completions",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert simulator.sim.received[-1].body == body
    row = meter.rows(1)[0]
    assert row["outcome"] == "upstream_error" and row["requested_model"] is None
    assert row["usage_source"] == "missing" and row["prompt_tokens"] is None


def test_non_json_content_type_and_empty_body_pass_through(meter, simulator):
    r1 = httpx.post(
        f"{meter.base_url}/chat/completions",
        content=b"model=m",
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    r2 = httpx.post(f"{meter.base_url}/chat/completions", content=b"", headers=AUTH)
    assert r1.status_code == 400 and r2.status_code == 400
    assert [r.body for r in list(simulator.sim.received)[-2:]] == [b"model=m", b""]
    assert len(meter.rows(2)) == 2


def test_unknown_path_passes_through(meter):
    response = httpx.get(f"{meter.url}/v1/no/such/thing?x=1", headers=AUTH)
    assert response.status_code == 404
    row = meter.rows(1)[0]
    assert row["endpoint"] == "/v1/no/such/thing" and row["method"] == "GET"


def test_models_list_passes_through(meter):
    models = openai.OpenAI(base_url=meter.base_url, api_key="fw-k", max_retries=0).models.list()
    assert len(models.data) > 0
    assert meter.rows(1)[0]["endpoint"] == "/v1/models"


def test_20mb_body_passes_through_unchanged(meter, simulator):
    text = "word " * (4 * 1024 * 1024)  # 20 MiB of prompt
    body = ('{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"' + text + '"}]}').encode()
    assert len(body) > 20 * 1024 * 1024
    response = httpx.post(
        f"{meter.base_url}/chat/completions",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 200
    assert simulator.sim.received[-1].body == body
    row = meter.rows(1)[0]
    assert row["request_bytes"] == len(body)
    assert row["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]


def test_body_over_the_limit_gets_413_and_a_record(start_meter, simulator):
    meter = start_meter(simulator.url, max_request_bytes=1024)
    before = simulator.sim.stats.requests
    response = httpx.post(f"{meter.base_url}/chat/completions", content=b"x" * 2048, headers=AUTH)
    assert_openai_error(response, 413, "request_too_large")
    # chunked upload, no Content-Length: the limit still holds while reading
    chunked = httpx.post(f"{meter.base_url}/chat/completions", content=iter([b"y" * 700] * 3), headers=AUTH)
    assert_openai_error(chunked, 413, "request_too_large")
    assert simulator.sim.stats.requests == before
    rows = meter.rows(2)
    assert {r["outcome"] for r in rows} == {"proxy_error"} and {r["status_code"] for r in rows} == {413}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_upstream_down_gives_502(start_meter, client):
    meter = start_meter(f"http://127.0.0.1:{_closed_port()}", upstream_client=client)
    response = httpx.post(f"{meter.base_url}/chat/completions", json={"model": "m"}, headers=AUTH)
    error = assert_openai_error(response, 502, "upstream_unreachable")
    assert "upstream" in error["message"]
    row = meter.rows(1)[0]
    assert row["outcome"] == "proxy_error" and row["status_code"] == 502 and row["requested_model"] == "m"


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_upstream_slow_gives_504(start_meter, simulator, client):
    meter = start_meter(simulator.url, upstream_read_timeout=0.2, upstream_client=client)
    response = httpx.post(
        f"{meter.base_url}/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={**AUTH, "x-sim-ttft-ms": "2000"},
    )
    assert_openai_error(response, 504, "upstream_timeout")
    row = meter.rows(1)[0]
    assert row["outcome"] == "proxy_error" and row["status_code"] == 504


def test_streaming_works_with_every_upstream_client(start_meter, simulator):
    for client in ("httpx",):
        meter = start_meter(simulator.url, upstream_client=client)
        chunks = list(
            openai.OpenAI(base_url=meter.base_url, api_key="fw-k", max_retries=0).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        row = meter.rows(1)[0]
        assert row["completion_tokens"] == 4 and row["outcome"] == "ok"
