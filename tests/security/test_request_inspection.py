"""What meter reserves does not depend on the body's layout; a body it cannot read is forwarded
unchanged and reserved conservatively (meter.tap.request, meter.quota.spend)."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest

from tests.security.rawhttp import raw_request

ADMIN = "inspection-admin-token-0123456789"
SECRET = "0123456789abcdef0123456789abcdef"
KEY = "fw_limited_key_of_team_batch_0123456789"
AUTH = (b"Authorization", f"Bearer {KEY}".encode())
JSON = (b"Content-Type", b"application/json")
MESSAGES = [{"role": "user", "content": "hello"}]


def limited_meter(start_meter, upstream_url: str, **overrides):
    """A meter whose key KEY may use 1,000 tokens a minute."""
    meter = start_meter(
        upstream_url, admin_token=ADMIN, key_secret=SECRET, key_directory_refresh=0.05, **overrides
    )
    with httpx.Client(base_url=f"{meter.url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"}) as api:
        assert api.post("/teams", json={"name": "batch"}).status_code == 201
        created = api.post("/teams/batch/keys", json={"kind": "passthrough", "key": KEY})
        assert created.status_code == 201, created.text
        assert api.put(f"/keys/{created.json()['id']}/limits", json={"tpm": 1000}).status_code == 200
    return meter


def body_of(layout: str) -> bytes:
    """A chat request asking for 5,000 output tokens, written in the given layout."""
    request = {"model": "m", "messages": MESSAGES, "max_tokens": 5000}
    text = json.dumps(request)
    return {
        "leading whitespace": (" \r\n\t" * 20 + text).encode(),
        "utf-8 bom": b"\xef\xbb\xbf" + text.encode(),
        "utf-16": text.encode("utf-16"),
        "keys reversed": json.dumps(dict(reversed(request.items()))).encode(),
        "cap as a string": json.dumps({**request, "max_tokens": "5000"}).encode(),
        "cap as a float": json.dumps({**request, "max_tokens": 5000.0}).encode(),
        "n as a string": json.dumps({**request, "max_tokens": 600, "n": "2"}).encode(),
        "duplicate keys": text[:-1].encode() + b', "max_tokens": 5000}',
    }[layout]


@pytest.mark.parametrize(
    "layout",
    [
        "leading whitespace",
        "utf-8 bom",
        "utf-16",
        "keys reversed",
        "cap as a string",
        "cap as a float",
        "n as a string",
        "duplicate keys",
    ],
)
def test_a_token_limit_holds_whatever_the_layout(start_meter, scripted, layout):
    # The attack: a body starting with whitespace reserved nothing, so max_tokens 5,000 passed tpm 1,000.
    upstream, server = scripted
    meter = limited_meter(start_meter, server.url)
    response = raw_request(meter.url, b"/v1/chat/completions", headers=[AUTH, JSON], body=body_of(layout))
    assert response.status == 429, (layout, response.body)
    assert upstream.received == []
    row = meter.rows(1)[0]
    assert row["outcome"] == "rejected" and row["team"] == "batch"


@pytest.mark.parametrize("layout", ["leading whitespace", "utf-8 bom", "utf-16"])
def test_an_odd_layout_is_forwarded_unchanged_and_read(start_meter, scripted, layout):
    upstream, server = scripted
    upstream.script.headers = [(b"content-type", b"application/json")]
    upstream.script.chunks = [b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}']
    meter = start_meter(server.url)
    body = body_of(layout)
    response = raw_request(meter.url, b"/v1/chat/completions", headers=[AUTH, JSON], body=body)
    assert response.status == 200
    assert upstream.received[-1].body == body
    row = meter.rows(1)[0]
    assert row["requested_model"] == "m" and row["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        (
            [JSON, (b"Content-Encoding", b"gzip")],
            gzip.compress(json.dumps({"model": "m", "messages": MESSAGES}).encode()),
        ),
        ([JSON], b"\x00\x01 not json at all"),
        ([(b"Content-Type", b"multipart/form-data; boundary=x")], b"--x\r\n\r\nabc\r\n--x--\r\n"),
    ],
    ids=["gzip-encoded", "garbage", "multipart"],
)
def test_a_body_meter_cannot_read_is_forwarded_and_reserved_conservatively(
    start_meter, scripted, headers, body
):
    upstream, server = scripted
    upstream.script.headers = [(b"content-type", b"application/json")]
    upstream.script.chunks = [b"{}"]
    # The default output reservation (4,096) is over the tpm of 1,000: refused.
    meter = limited_meter(start_meter, server.url)
    response = raw_request(meter.url, b"/v1/chat/completions", headers=[AUTH, *headers], body=body)
    assert response.status == 429
    assert upstream.received == []
    # With a default under the limit, the same body is admitted and reaches the upstream unchanged.
    meter = limited_meter(start_meter, server.url, quota_default_max_tokens=500)
    response = raw_request(meter.url, b"/v1/chat/completions", headers=[AUTH, *headers], body=body)
    assert response.status == 200
    assert upstream.received[-1].body == body
