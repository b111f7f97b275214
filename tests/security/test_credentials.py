"""Credentials: one per request, judged on what is forwarded; a virtual key never leaves meter; header
bytes pass unchanged (meter.tenancy.identity, meter.forward.headers)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.security.rawhttp import raw_request

ADMIN = "credentials-admin-token-0123456789"
SECRET = "0123456789abcdef0123456789abcdef"
UPSTREAM = "fw_upstream_credential_of_the_team_42"
MODEL = "llama-v3p1-8b-instruct"
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()
JSON = (b"Content-Type", b"application/json")
PASSTHROUGH = "fw_passthrough_key_of_search_0123456789"


@pytest.fixture
def teams(start_meter, simulator):
    """A meter with team "search": a virtual key and a passthrough key, the passthrough key limited
    to 1 request a minute."""
    meter = start_meter(
        simulator.url,
        admin_token=ADMIN,
        key_secret=SECRET,
        upstream_api_key=UPSTREAM,
        key_directory_refresh=0.05,
    )
    with httpx.Client(base_url=f"{meter.url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"}) as api:
        assert api.post("/teams", json={"name": "search"}).status_code == 201
        virtual = api.post("/teams/search/keys", json={}).json()["key"]
        created = api.post("/teams/search/keys", json={"kind": "passthrough", "key": PASSTHROUGH})
        assert created.status_code == 201, created.text
        limited = api.put(f"/keys/{created.json()['id']}/limits", json={"rpm": 1})
        assert limited.status_code == 200, limited.text
    return meter, virtual


def post(meter, headers, body=CHAT, target=b"/v1/chat/completions"):
    return raw_request(meter.url, target, headers=[JSON, *headers], body=body)


def upstream_saw(simulator, secret: str) -> bool:
    return any(
        secret in value or secret in request.path
        for request in simulator.sim.received
        for _, value in request.headers
    )


def test_two_authorization_headers_are_refused(teams, simulator):
    meter, _ = teams
    # The attack: a junk first header took a limited key past its rpm (admitted on one, forwarded both).
    key = f"Bearer {PASSTHROUGH}".encode()
    assert post(meter, [(b"Authorization", key)]).status == 200
    for junk in (b"Bearer junk", key):
        response = post(meter, [(b"Authorization", junk), (b"Authorization", key)])
        assert response.status == 400
        assert response.error()["code"] == "invalid_credentials"
    assert post(meter, [(b"Authorization", key)]).status == 429  # the rpm of 1 still holds
    assert len(simulator.sim.received) == 1
    rows = meter.rows(4)
    assert [(r["status_code"], r["outcome"]) for r in rows] == [
        (200, "ok"),
        (400, "proxy_error"),
        (400, "proxy_error"),
        (429, "rejected"),
    ]


def test_different_credentials_in_several_headers_are_refused(teams, simulator):
    meter, _ = teams
    response = post(
        meter,
        [(b"Authorization", b"Bearer fw_some_other_key_0000000000"), (b"x-api-key", PASSTHROUGH.encode())],
    )
    assert response.status == 400 and response.error()["code"] == "invalid_credentials"
    assert len(simulator.sim.received) == 0


@pytest.mark.parametrize(
    "placement",
    [
        "second Authorization header",
        "x-api-key beside another key",
        "a custom header",
        "the query string",
        "inside another scheme",
    ],
)
def test_a_virtual_key_outside_the_credential_is_refused_and_never_forwarded(teams, simulator, placement):
    meter, virtual = teams
    key = virtual.encode()
    other = (b"Authorization", f"Bearer {PASSTHROUGH}".encode())
    headers, target = {
        "second Authorization header": ([other, (b"Authorization", key)], b"/v1/chat/completions"),
        "x-api-key beside another key": ([other, (b"x-api-key", key)], b"/v1/chat/completions"),
        "a custom header": ([other, (b"x-debug-note", b"was using " + key)], b"/v1/chat/completions"),
        "the query string": ([other], b"/v1/chat/completions?api_key=" + key),
        "inside another scheme": ([(b"Authorization", b"Token " + key)], b"/v1/chat/completions"),
    }[placement]
    response = post(meter, headers, target=target)
    assert response.status == 400
    assert response.error()["code"] == "invalid_credentials"
    assert virtual not in response.body.decode()
    assert not upstream_saw(simulator, virtual) and not upstream_saw(simulator, virtual[3:])
    row = meter.rows(1)[0]
    assert row["status_code"] == 400 and row["outcome"] == "proxy_error"


@pytest.mark.parametrize(
    "form",
    ["Bearer {k}", "bearer {k}", "BEARER {k}", "BeArEr \t {k}", "Bearer   {k}  ", "{k}"],
)
def test_a_virtual_key_in_any_accepted_form_is_swapped_never_forwarded(teams, simulator, form):
    meter, virtual = teams
    response = post(meter, [(b"Authorization", form.format(k=virtual).encode())])
    assert response.status == 200, response.body
    request = simulator.sim.received[-1]
    assert request.header("authorization") == f"Bearer {UPSTREAM}"
    assert not upstream_saw(simulator, virtual)
    assert meter.rows(1)[0]["team"] == "search"


@pytest.mark.parametrize("header", [b"api-key", b"x-api-key"])
def test_a_virtual_key_in_an_api_key_header_becomes_the_team_credential(teams, simulator, header):
    meter, virtual = teams
    response = post(meter, [(header, virtual.encode())])
    assert response.status == 200
    request = simulator.sim.received[-1]
    assert request.header("authorization") == f"Bearer {UPSTREAM}"
    assert request.header(header.decode()) is None
    assert not upstream_saw(simulator, virtual)


def test_a_passthrough_key_is_the_same_identity_with_or_without_the_scheme(teams, simulator):
    meter, _ = teams
    # The key is limited to 1 rpm: sending it without "Bearer" (which the upstream may accept) must
    # not make it an unknown, unlimited key.
    assert post(meter, [(b"Authorization", f"Bearer {PASSTHROUGH}".encode())]).status == 200
    assert post(meter, [(b"Authorization", PASSTHROUGH.encode())]).status == 429
    assert post(meter, [(b"x-api-key", PASSTHROUGH.encode())]).status == 429
    rows = meter.rows(3)
    assert {r["key_fingerprint"] for r in rows} == {rows[0]["key_fingerprint"]}
    assert {r["team"] for r in rows} == {"search"}


def test_short_keys_show_no_suffix(meter):
    client = openai.OpenAI(base_url=meter.base_url, api_key="fw-abc", max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    long_key = "fw_a_long_enough_key_to_show_4_WXYZ"
    openai.OpenAI(base_url=meter.base_url, api_key=long_key, max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    short, long = meter.rows(2)
    assert short["key_suffix"] is None and short["key_fingerprint"]
    assert long["key_suffix"] == "...WXYZ"


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_non_ascii_header_bytes_pass_unchanged_both_ways(start_meter, scripted, client):
    upstream, server = scripted
    upstream.script.headers = [
        (b"content-type", b"application/json"),
        (b"x-reply", b"caf\xc3\xa9 \xe2\x9c\x93"),
    ]
    upstream.script.chunks = [b"{}"]
    meter = start_meter(server.url, upstream_client=client)
    response = post(meter, [(b"Authorization", b"Bearer fw-k"), (b"x-note", b"caf\xc3\xa9")])
    assert response.status == 200
    assert (b"x-note", b"caf\xc3\xa9") in upstream.received[-1].headers  # not c3 83 c2 a9
    assert response.header(b"x-reply") == b"caf\xc3\xa9 \xe2\x9c\x93"


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_header_bytes_that_are_not_utf8_are_refused_whichever_client(start_meter, scripted, client):
    upstream, server = scripted
    meter = start_meter(server.url, upstream_client=client)
    response = post(meter, [(b"Authorization", b"Bearer fw-k"), (b"x-note", b"caf\xe9")])
    assert response.status == 400
    assert response.error()["code"] == "invalid_header"
    assert upstream.received == []
    assert meter.rows(1)[0]["outcome"] == "proxy_error"
