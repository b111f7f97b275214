"""Whatever a client sends, records, labels and /metrics stay small (meter.bounds), and the request is
still forwarded unchanged."""

from __future__ import annotations

import json

import httpx

from meter.bounds import MARK, MODEL
from tests.security.rawhttp import raw_request

AUTH = (b"Authorization", b"Bearer fw-bounds-test-key-0123456789")
JSON = (b"Content-Type", b"application/json")
OK_BODY = b'{"model": "served", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}'


def metrics_text(meter) -> str:
    return httpx.get(f"{meter.url}/metrics").text


def test_a_17_mib_model_name_is_forwarded_unchanged_and_recorded_cut(start_meter, scripted):
    # The attack: a 17 MiB model name no longer fit a journal frame (/readyz 503, the record held in
    # memory only), and three 1 MiB names made /metrics 1.3 GB.
    upstream, server = scripted
    upstream.script.headers = [(b"content-type", b"application/json")]
    upstream.script.chunks = [OK_BODY]
    meter = start_meter(server.url)
    names = ["m" * (1 << 20), "n" * (1 << 20), "o" * (1 << 20), "p" * (17 << 20)]
    for name in names:
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "x"}]}).encode()
        response = raw_request(
            meter.url, b"/v1/chat/completions", headers=[AUTH, JSON], body=body, timeout=60
        )
        assert response.status == 200
        assert upstream.received[-1].body == body
    rows = meter.rows(4)
    for row, name in zip(rows, names, strict=True):
        assert len(row["requested_model"]) == MODEL
        assert row["requested_model"] == name[: MODEL - 1] + MARK
    ready = httpx.get(f"{meter.url}/readyz")
    assert ready.status_code == 200, ready.text
    assert len(metrics_text(meter)) < 200_000


def test_junk_model_names_cannot_use_up_the_labels_of_real_ones(start_meter, scripted):
    upstream, server = scripted
    upstream.script.headers = [(b"content-type", b"application/json")]
    meter = start_meter(server.url)
    upstream.script.status, upstream.script.chunks = 404, [b'{"error": {"message": "no such model"}}']
    for i in range(150):  # more than the 100 model labels
        body = json.dumps({"model": f"junk-{i}", "messages": []}).encode()
        assert raw_request(meter.url, b"/v1/chat/completions", headers=[AUTH, JSON], body=body).status == 404
    upstream.script.status, upstream.script.chunks = 200, [OK_BODY]
    body = json.dumps({"model": "real-model", "messages": []}).encode()
    assert raw_request(meter.url, b"/v1/chat/completions", headers=[AUTH, JSON], body=body).status == 200
    text = metrics_text(meter)
    assert 'model="real-model"' in text
    assert "junk-" not in text
    assert 'meter_request_errors_total{error_type="404",model="other",team="unassigned"} 150.0' in text


def test_long_paths_and_upstream_ids_are_recorded_cut(start_meter, scripted):
    upstream, server = scripted
    upstream.script.headers = [(b"content-type", b"application/json"), (b"x-request-id", b"r" * 4000)]
    upstream.script.chunks = [OK_BODY]
    meter = start_meter(server.url)
    path = b"/v1/" + b"p" * 3000
    assert raw_request(meter.url, path, headers=[AUTH, JSON], body=b"{}").status == 200
    assert upstream.received[-1].raw_path == path
    row = meter.rows(1)[0]
    assert len(row["endpoint"]) == 512 and row["endpoint"].endswith(MARK)
    assert len(row["request_id"]) == 256 and row["request_id"].endswith(MARK)
    assert raw_request(meter.url, b"/v1/" + b"p" * 9000, headers=[AUTH, JSON], body=b"{}").status in (
        400,
        431,
    )
