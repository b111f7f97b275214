"""The Fireworks-compatible upstream simulator, driven by the real ``openai`` SDK over a loopback socket,
by raw httpx where the SDK would hide what is on the wire, and by direct ASGI calls where a test must
see individual ``send`` calls."""

from __future__ import annotations

import ast
import asyncio
import base64
import struct
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meter.simulator
from meter.simulator import (
    FIREWORKS_MODEL_PREFIX,
    MIDSTREAM_TOKENS,
    PER_MESSAGE_TOKENS,
    Simulator,
    SimulatorConfig,
    completion_text,
    count_prompt_tokens,
    create_simulator,
)
from meter.simulator.app import YIELD_EVERY
from meter.simulator.shapes import embedding_vector
from tests.conftest import wait_for
from tests.support.loop_turns import loop_turns
from tests.support.serve import RunningServer, serve_in_thread

KEY = "fw-test"
AUTH = {"authorization": f"Bearer {KEY}"}
MODEL = "llama-v3p1-8b-instruct"
FULL_MODEL = FIREWORKS_MODEL_PREFIX + MODEL
MESSAGES: Any = [  # typed loosely: the SDK's message TypedDicts add nothing here
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the  whole\nworld"},
]
PROMPT_TOKENS = 2 * PER_MESSAGE_TOKENS + 3 + 6
DEFAULT_TOKENS = 16


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Simulator, RunningServer]]:
    sim = create_simulator()
    with serve_in_thread(sim) as server:
        yield sim, server


@pytest.fixture
def sim(served: tuple[Simulator, RunningServer]) -> Simulator:
    served[0].reset()
    return served[0]


@pytest.fixture
def url(served: tuple[Simulator, RunningServer], sim: Simulator) -> str:
    return served[1].url


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for raw requests: ``httpx.post()`` builds a new client (and TLS context) each call."""
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(url: str) -> Any:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.005)


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event; the simulator never splits data over lines."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name = None
        data = ""
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            elif key == "data":
                data = value
        events.append((name, data))
    return events


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, **extra}


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class AsgiCall:
    """Drives the app directly: records every ``send``; :meth:`disconnect` plays the client leaving."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._gone = asyncio.Event()
        self._sent_body = False
        self.messages: list[MutableMapping[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.messages.append(message)

    def disconnect(self) -> None:
        self._gone.set()

    @property
    def bodies(self) -> list[MutableMapping[str, Any]]:
        return [m for m in self.messages if m["type"] == "http.response.body"]


def scope(path: str, headers: dict[str, str] | None = None, method: str = "POST") -> dict[str, Any]:
    pairs = [(k.encode(), v.encode()) for k, v in {**AUTH, **(headers or {})}.items()]
    return {"type": "http", "method": method, "path": path, "query_string": b"", "headers": pairs}


# -- the deterministic rules -----------------------------------------------------------------------


def test_prompt_tokens_are_words_plus_a_per_message_overhead() -> None:
    assert count_prompt_tokens(chat_body()) == PROMPT_TOKENS
    parts = {"role": "user", "content": [{"type": "text", "text": "two words"}, {"type": "image_url"}]}
    assert count_prompt_tokens({"messages": [parts]}) == PER_MESSAGE_TOKENS + 2
    assert count_prompt_tokens({"prompt": "one two three"}) == 3
    assert count_prompt_tokens({"prompt": ["a b", "c"]}) == 3
    assert count_prompt_tokens({"prompt": [101, 102, 103, 104]}) == 4
    assert count_prompt_tokens({"input": [[1, 2], [3]]}) == 3
    assert (
        count_prompt_tokens({"input": "hello world", "instructions": "be brief"})
        == 2 + PER_MESSAGE_TOKENS + 2
    )
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi there"}]}
    assert count_prompt_tokens({"input": [item]}) == PER_MESSAGE_TOKENS + 2


@settings(max_examples=50, deadline=None)
@given(
    contents=st.lists(st.lists(st.sampled_from(["a", "bb", "ccc"]), max_size=8), min_size=1, max_size=5),
    max_tokens=st.none() | st.integers(0, 40),
    n=st.integers(1, 3),
)
async def test_usage_follows_the_rules_for_any_request(
    contents: list[list[str]], max_tokens: int | None, n: int
) -> None:
    messages = [{"role": "user", "content": " ".join(words)} for words in contents]
    body = {"model": MODEL, "messages": messages, "n": n, "max_tokens": max_tokens}
    call = AsgiCall(orjson.dumps(body))
    await Simulator()(scope("/v1/chat/completions"), call.receive, call.send)
    answer = orjson.loads(call.bodies[0]["body"])
    per_choice = DEFAULT_TOKENS if max_tokens is None else max_tokens
    prompt = sum(PER_MESSAGE_TOKENS + len(words) for words in contents)
    assert answer["usage"] == usage(prompt, n * per_choice)
    assert [c["message"]["content"] for c in answer["choices"]] == [completion_text(per_choice)] * n
    assert {c["finish_reason"] for c in answer["choices"]} == {"stop" if max_tokens is None else "length"}


@pytest.mark.parametrize("module", ["tokens", "faults", "plan", "shapes"])
def test_the_core_is_pure(module: str) -> None:
    """Token rules, planning, shapes and faults import no I/O: only the standard library, orjson and
    each other (STYLE rule 2)."""
    source = Path(meter.simulator.__file__).with_name(f"{module}.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
    allowed = {
        "__future__",
        "base64",
        "dataclasses",
        "enum",
        "functools",
        "math",
        "struct",
        "typing",
        "orjson",
    }
    assert imported <= allowed


def test_config_rejects_bad_values_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="ttft_ms"):
        SimulatorConfig(ttft_ms=-1)
    with pytest.raises(ValueError, match="completion_tokens"):
        SimulatorConfig(completion_tokens=-3)


# -- chat completions ------------------------------------------------------------------------------


def test_chat_completion(client: openai.OpenAI, sim: Simulator) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert answer.id.startswith("chatcmpl-")
    assert answer.object == "chat.completion"
    assert answer.model == FULL_MODEL
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.model_dump(exclude_none=True) == usage(PROMPT_TOKENS, 5)
    assert sim.stats.completed == 1 and sim.stats.tokens_generated == 5


def test_chat_default_length_stops_and_full_model_paths_are_echoed(client: openai.OpenAI) -> None:
    model = "accounts/acme/deployedModels/mine"
    answer = client.chat.completions.create(model=model, messages=MESSAGES)
    assert answer.model == model
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == completion_text(DEFAULT_TOKENS)
    answer = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=2,
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 2


async def test_chat_completion_async_with_n_and_cached_tokens(aclient: openai.AsyncOpenAI) -> None:
    answer = await aclient.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        n=3,
        max_tokens=4,
        extra_headers={"x-sim-cached-tokens": "5"},
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert {c.message.content for c in answer.choices} == {completion_text(4)}
    assert answer.usage is not None
    assert answer.usage.model_dump(exclude_none=True) == usage(PROMPT_TOKENS, 12, cached=5)


def test_cached_tokens_never_exceed_the_prompt(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        extra_headers={"x-sim-cached-tokens": "100000"},
    )
    assert raw.headers["fireworks-cached-prompt-tokens"] == str(PROMPT_TOKENS)
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == PROMPT_TOKENS


def test_chat_stream_usage_on_the_finish_chunk(client: openai.OpenAI, sim: Simulator) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:4]] == ["tok0 ", "tok1 ", "tok2 "]
    finish = chunks[-1]
    assert len(chunks) == 5
    assert finish.choices[0].finish_reason == "length"
    assert finish.usage is not None
    assert finish.usage.model_dump(exclude_none=True) == usage(PROMPT_TOKENS, 3)
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {FULL_MODEL}
    assert sim.stats.streams_started == 1 and sim.stats.completed == 1 and sim.stats.tokens_generated == 3


def test_chat_stream_wire_format(url: str, http: httpx.Client) -> None:
    response = http.post(
        f"{url}/v1/chat/completions", json=chat_body(max_tokens=2, stream=True), headers=AUTH
    )
    assert response.headers["content-type"] == "text/event-stream"
    events = sse_events(response.content)
    assert events[-1] == (None, "[DONE]")
    assert len(events) == 1 + 2 + 1 + 1
    assert response.content.endswith(b"\n\ndata: [DONE]\n\n")


def test_chat_stream_include_usage_sends_a_separate_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    finish, last = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "length" and finish.usage is None
    assert last.choices == []
    assert last.usage is not None and last.usage.model_dump(exclude_none=True) == usage(PROMPT_TOKENS, 2)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_n_choices_repeat_the_cumulative_usage(url: str, http: httpx.Client) -> None:
    response = http.post(
        f"{url}/v1/chat/completions", json=chat_body(max_tokens=2, n=2, stream=True), headers=AUTH
    )
    chunks = [orjson.loads(data) for _, data in sse_events(response.content)[:-1]]
    finishes = [c for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert [f["choices"][0]["index"] for f in finishes] == [0, 1]
    assert [f["usage"] for f in finishes] == [usage(PROMPT_TOKENS, 4)] * 2
    for index in (0, 1):
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == index
        )
        assert text == completion_text(2)


# -- completions, embeddings, responses ------------------------------------------------------------


def test_completions(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3)
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
    assert answer.model == FULL_MODEL
    assert answer.choices[0].text == completion_text(3) and answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.model_dump(exclude_none=True) == usage(4, 3)


async def test_completions_stream_async(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.completions.create(model=MODEL, prompt=[1, 2, 3], n=2, stream=True)
    chunks = [c async for c in stream]
    texts = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)]
    assert texts == [completion_text(DEFAULT_TOKENS)] * 2
    finishes = [c for c in chunks if c.choices[0].finish_reason]
    assert [f.choices[0].finish_reason for f in finishes] == ["stop", "stop"]
    assert all(f.usage is not None and f.usage.completion_tokens == 2 * DEFAULT_TOKENS for f in finishes)
    assert all(f.usage is not None and f.usage.prompt_tokens == 3 for f in finishes)


def test_embeddings_base64_and_float(client: openai.OpenAI, url: str, http: httpx.Client) -> None:
    answer = client.embeddings.create(
        model="nomic-ai/nomic-embed-text-v1.5", input=["a b c", "d"], dimensions=8
    )
    assert answer.model == "nomic-ai/nomic-embed-text-v1.5"
    assert [e.index for e in answer.data] == [0, 1]
    assert answer.data[0].embedding == pytest.approx(embedding_vector(8)[0])
    assert answer.usage.prompt_tokens == 4 and answer.usage.total_tokens == 4
    raw = http.post(
        f"{url}/v1/embeddings",
        json={"model": "nomic-embed", "input": "x y", "encoding_format": "base64"},
        headers=AUTH,
    ).json()
    assert raw["model"] == FIREWORKS_MODEL_PREFIX + "nomic-embed"
    decoded = struct.unpack("<768f", base64.b64decode(raw["data"][0]["embedding"]))
    assert list(decoded) == embedding_vector(768)[0]
    assert raw["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


def test_responses(client: openai.OpenAI) -> None:
    answer = client.responses.create(model=MODEL, input="hello there world", instructions="be brief")
    assert answer.id.startswith("resp_") and answer.object == "response" and answer.status == "completed"
    assert answer.model == FULL_MODEL
    assert answer.output_text == completion_text(DEFAULT_TOKENS)
    assert answer.usage is not None
    assert (answer.usage.input_tokens, answer.usage.output_tokens, answer.usage.total_tokens) == (
        3 + PER_MESSAGE_TOKENS + 2,
        DEFAULT_TOKENS,
        3 + PER_MESSAGE_TOKENS + 2 + DEFAULT_TOKENS,
    )


async def test_responses_stream(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.responses.create(model=MODEL, input="hi", max_output_tokens=3, stream=True)
    events = [e async for e in stream]
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["tok0 ", "tok1 ", "tok2 "]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == completion_text(3)
    assert completed.response.usage is not None
    assert (completed.response.usage.input_tokens, completed.response.usage.output_tokens) == (1, 3)
    assert completed.response.usage.total_tokens == 4


def test_responses_stream_wire_format_has_named_events_and_no_done(url: str, http: httpx.Client) -> None:
    response = http.post(
        f"{url}/inference/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}, headers=AUTH
    )
    events = sse_events(response.content)
    assert all(name == orjson.loads(data)["type"] for name, data in events)
    assert "[DONE]" not in response.text
    assert events[-1][0] == "response.completed"


def test_responses_stream_helper_accumulates(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="hi", max_output_tokens=2) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == completion_text(2)


# -- perf_metrics and headers ----------------------------------------------------------------------


PERF = {"perf_metrics_in_response": True}


def test_perf_metrics_in_json_body(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body=PERF)
    perf = (answer.model_extra or {})["perf_metrics"]
    assert perf["prompt-tokens"] == PROMPT_TOKENS and perf["cached-prompt-tokens"] == 0
    assert isinstance(perf["server-time-to-first-token"], float)
    assert all(isinstance(v, (int, float, str)) for v in perf.values())
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert "perf_metrics" not in (plain.model_extra or {})


def test_perf_metrics_in_the_finish_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=2,
            stream=True,
            extra_body=PERF,
        )
    )
    with_perf = [c for c in chunks if "perf_metrics" in (c.model_extra or {})]
    assert with_perf == [chunks[-1]] and chunks[-1].choices[0].finish_reason == "length"
    assert (chunks[-1].model_extra or {})["perf_metrics"]["prompt-tokens"] == PROMPT_TOKENS


def test_fireworks_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        extra_headers={"x-sim-ttft-ms": "30"},
    )
    headers = raw.headers
    assert headers["content-type"] == "application/json"
    assert headers["fireworks-prompt-tokens"] == str(PROMPT_TOKENS)
    assert headers["fireworks-cached-prompt-tokens"] == "0"
    ttft = float(headers["fireworks-server-time-to-first-token"])
    assert ttft >= 0.03
    assert float(headers["fireworks-server-processing-time"]) >= ttft
    numeric = [k for k in headers if k.startswith("fireworks-") and k != "fireworks-deployment-replica"]
    assert len(numeric) >= 6
    for name in numeric:
        float(headers[name])
    assert headers["x-request-id"] and raw.parse().id == "chatcmpl-" + headers["x-request-id"]
    assert int(headers["x-ratelimit-limit-requests"]) > 0
    assert {"x-ratelimit-remaining-tokens-prompt", "x-ratelimit-limit-tokens-generated"} <= set(headers)


def test_stream_headers(url: str, http: httpx.Client) -> None:
    response = http.post(f"{url}/v1/chat/completions", json=chat_body(stream=True), headers=AUTH)
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["fireworks-prompt-tokens"] == str(PROMPT_TOKENS)
    assert "fireworks-server-time-to-first-token" in response.headers
    assert "x-request-id" in response.headers and "content-length" not in response.headers


async def test_every_stream_event_is_its_own_send() -> None:
    call = AsgiCall(orjson.dumps(chat_body(max_tokens=4, stream=True)))
    await Simulator()(scope("/v1/chat/completions"), call.receive, call.send)
    bodies = call.bodies
    assert [b["more_body"] for b in bodies] == [True] * (len(bodies) - 1) + [False]
    assert all(len(sse_events(b["body"])) == 1 for b in bodies)  # one SSE event per send
    contents = [orjson.loads(b["body"][6:])["choices"][0]["delta"].get("content") for b in bodies[1:5]]
    assert contents == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]


# -- errors ----------------------------------------------------------------------------------------


ERRORS = [
    (400, openai.BadRequestError, "invalid_request_error"),
    (401, openai.AuthenticationError, "authentication_error"),
    (404, openai.NotFoundError, "not_found_error"),
    (429, openai.RateLimitError, "rate_limit_error"),
    (500, openai.InternalServerError, "internal_server_error"),
    (503, openai.InternalServerError, "service_unavailable"),
]


@pytest.mark.parametrize(("status", "error", "kind"), ERRORS)
def test_injected_error_by_header(
    client: openai.OpenAI, sim: Simulator, status: int, error: type[openai.APIStatusError], kind: str
) -> None:
    with pytest.raises(error) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            extra_headers={"x-sim-error": str(status)},
        )
    assert caught.value.status_code == status
    assert caught.value.type == kind
    assert isinstance(caught.value.body, dict) and caught.value.body["object"] == "error"
    assert caught.value.body["message"]
    assert "x-request-id" in caught.value.response.headers
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "1"
    assert sim.stats.errors == 1 and sim.stats.completed == 0 and sim.stats.tokens_generated == 0


@pytest.mark.parametrize(("status", "error", "kind"), ERRORS)
async def test_injected_error_by_model(
    aclient: openai.AsyncOpenAI, status: int, error: type[openai.APIStatusError], kind: str
) -> None:
    with pytest.raises(error) as caught:
        await aclient.chat.completions.create(model=f"sim-error-{status}", messages=MESSAGES, stream=True)
    assert caught.value.status_code == status and caught.value.type == kind


def test_injected_error_on_every_api(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="sim-error-429", input="x")
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model=FIREWORKS_MODEL_PREFIX + "sim-error-503", input="x")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=MODEL, prompt="x", extra_headers={"x-sim-error": "404"})
    with pytest.raises(openai.InternalServerError):
        client.models.list(extra_headers={"x-sim-error": "midstream"})
    with pytest.raises(openai.BadRequestError, match="unknown simulated error"):
        client.completions.create(model=MODEL, prompt="x", extra_headers={"x-sim-error": "418"})


def test_midstream_error(client: openai.OpenAI, sim: Simulator) -> None:
    received = []
    with pytest.raises(openai.APIError, match="mid-stream") as caught:
        for chunk in client.chat.completions.create(
            model="sim-error-midstream",
            messages=MESSAGES,
            stream=True,
        ):
            received.append(chunk.choices[0].delta.content)
    assert received == [None, "tok0 ", "tok1 ", "tok2 "][: MIDSTREAM_TOKENS + 1]
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "internal_server_error"
    assert sim.stats.errors == 1 and sim.stats.tokens_generated == MIDSTREAM_TOKENS


def test_midstream_error_wire_format(url: str, http: httpx.Client) -> None:
    headers = {**AUTH, "x-sim-error": "midstream"}
    response = http.post(
        f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}, headers=headers
    )
    assert response.status_code == 200
    events = sse_events(response.content)
    assert len(events) == MIDSTREAM_TOKENS + 1
    error = orjson.loads(events[-1][1])["error"]
    assert error["object"] == "error" and error["code"] == "internal_server_error"
    assert "[DONE]" not in response.text


def test_midstream_error_on_responses(url: str, http: httpx.Client) -> None:
    response = http.post(
        f"{url}/v1/responses",
        json={"model": "sim-error-midstream", "input": "x", "stream": True},
        headers=AUTH,
    )
    name, data = sse_events(response.content)[-1]
    assert name == "error" and orjson.loads(data)["error"]["type"] == "internal_server_error"


def test_midstream_asked_of_a_non_streamed_request_is_a_500(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="sim-error-midstream", messages=MESSAGES)


def test_invalid_json_is_a_fireworks_400(url: str, http: httpx.Client) -> None:
    response = http.post(f"{url}/v1/chat/completions", content=b"{not json", headers=AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["object"] == "error" and error["type"] == "invalid_request_error"
    assert "Invalid JSON" in error["message"]


def test_invalid_requests_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="x-sim-ttft-ms"):
        client.models.list(extra_headers={"x-sim-ttft-ms": "soon"})


def test_missing_authorization_is_401(url: str, client: openai.OpenAI, http: httpx.Client) -> None:
    response = http.post(f"{url}/v1/chat/completions", json=chat_body())
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_unknown_path_is_a_404_json_error(url: str, http: httpx.Client) -> None:
    response = http.post(f"{url}/v1/nothing-here", json={}, headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["object"] == "error"


def test_wrong_method_is_405(url: str, http: httpx.Client) -> None:
    response = http.get(f"{url}/v1/chat/completions", headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_models(client: openai.OpenAI, url: str, http: httpx.Client) -> None:
    ids = [m.id for m in client.models.list()]
    assert FULL_MODEL in ids and all(m.startswith(("accounts/", "nomic-ai/")) for m in ids)
    raw = http.get(f"{url}/inference/v1/models", headers=AUTH)
    assert [m["id"] for m in raw.json()["data"]] == ids
    assert client.models.retrieve(FULL_MODEL).id == FULL_MODEL


def test_inference_prefixed_paths(url: str) -> None:
    with openai.OpenAI(base_url=f"{url}/inference/v1", api_key=KEY, max_retries=0) as c:
        answer = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert answer.choices[0].message.content == "tok0 "


# -- disconnects and timing ------------------------------------------------------------------------


def test_client_disconnect_cancels_the_stream(url: str, sim: Simulator) -> None:
    headers = {**AUTH, "x-sim-token-delay-ms": "60000"}
    started = time.monotonic()
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST", f"{url}/v1/chat/completions", json=chat_body(stream=True), headers=headers
        ) as response,
    ):
        first = next(response.iter_bytes())
        assert first.startswith(b"data: ")
    wait_until(lambda: sim.stats.streams_cancelled == 1)
    assert time.monotonic() - started < 30  # the 60 s token delay was cut short
    assert sim.stats.tokens_generated == 1  # tok0 goes out at once; tok1 was 60 s away
    assert sim.stats.completed == 0
    wait_until(lambda: sim.stats.in_flight == 0)


def test_client_disconnect_before_the_first_token(url: str, sim: Simulator) -> None:
    with (
        httpx.Client(timeout=0.2) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(
            f"{url}/v1/chat/completions",
            json=chat_body(stream=True),
            headers={**AUTH, "x-sim-ttft-ms": "60000"},
        )
    wait_until(lambda: sim.stats.streams_cancelled == 1)
    with (
        httpx.Client(timeout=0.2) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(f"{url}/v1/chat/completions", json=chat_body(), headers={**AUTH, "x-sim-ttft-ms": "60000"})
    wait_until(lambda: sim.stats.cancelled == 1)
    assert sim.stats.tokens_generated == 0


async def test_disconnect_stops_generation_immediately() -> None:
    sim = Simulator(SimulatorConfig(token_delay_ms=60_000))
    call = AsgiCall(orjson.dumps(chat_body(stream=True)))
    task = asyncio.create_task(sim(scope("/v1/chat/completions"), call.receive, call.send))
    while sim.stats.tokens_generated < 1:  # the first token needs no delay
        await asyncio.sleep(0)
    call.disconnect()
    await asyncio.wait_for(task, timeout=5)
    assert sim.stats.streams_cancelled == 1 and sim.stats.tokens_generated == 1
    assert sim.stats.in_flight == 0


def test_client_disconnect_cancels_a_stream_without_delays(url: str, sim: Simulator) -> None:
    body = chat_body(stream=True, max_tokens=10_000_000)
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH) as response,
    ):
        next(response.iter_bytes())
    wait_until(lambda: sim.stats.streams_cancelled == 1)
    assert sim.stats.tokens_generated < 10_000_000 and sim.stats.completed == 0


async def test_a_stream_without_delays_yields_to_other_tasks() -> None:
    call = AsgiCall(orjson.dumps(chat_body(stream=True, max_tokens=10 * YIELD_EVERY)))
    async with loop_turns() as turns:
        await Simulator()(scope("/v1/chat/completions"), call.receive, call.send)
    assert turns.count >= 9


async def test_a_stream_without_delays_notices_a_disconnect() -> None:
    sim = Simulator()
    call = AsgiCall(orjson.dumps(chat_body(stream=True, max_tokens=100_000)))

    async def send(message: MutableMapping[str, Any]) -> None:
        await call.send(message)
        if len(call.messages) == 10:
            call.disconnect()

    await sim(scope("/v1/chat/completions"), call.receive, send)
    assert sim.stats.streams_cancelled == 1
    assert sim.stats.tokens_generated <= 2 * YIELD_EVERY


async def test_timing_comes_from_config_and_headers() -> None:
    sim = Simulator(SimulatorConfig(ttft_ms=20))
    call = AsgiCall(orjson.dumps(chat_body()))
    await sim(scope("/v1/chat/completions"), call.receive, call.send)
    headers = dict(call.messages[0]["headers"])
    assert float(headers[b"fireworks-server-time-to-first-token"]) >= 0.02
    call = AsgiCall(orjson.dumps(chat_body(max_tokens=3, stream=True)))
    started = time.perf_counter()
    await sim(
        scope("/v1/chat/completions", {"x-sim-ttft-ms": "0", "x-sim-token-delay-ms": "15"}),
        call.receive,
        call.send,
    )
    assert time.perf_counter() - started >= 0.03  # two gaps between three tokens
    assert float(dict(call.messages[0]["headers"])[b"fireworks-server-time-to-first-token"]) < 0.02


# -- inspection ------------------------------------------------------------------------------------


def test_inspection_endpoints(client: openai.OpenAI, url: str, sim: Simulator, http: httpx.Client) -> None:
    client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers={"x-trace": "abc"})
    http.post(f"{url}/inference/v1/completions?debug=1", json={"model": MODEL, "prompt": "x"}, headers=AUTH)
    stats = http.get(f"{url}/_sim/stats").json()
    assert stats["requests"] == 2 and stats["completed"] == 2
    assert stats["tokens_generated"] == 2 * DEFAULT_TOKENS
    recent = http.get(f"{url}/_sim/requests").json()
    assert [(r["method"], r["path"]) for r in recent] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/inference/v1/completions"),
    ]
    assert ["authorization", f"Bearer {KEY}"] in recent[0]["headers"]
    assert ["x-trace", "abc"] in recent[0]["headers"]
    assert recent[1]["query_string"] == "debug=1"
    assert recent[0]["body_length"] == len(sim.received[0].body) > 0
    assert sim.received[0].json()["messages"] == MESSAGES
    assert sim.received[0].header("X-Trace") == "abc"
    assert http.get(f"{url}/_sim/requests?limit=1").json() == recent[-1:]
    assert http.post(f"{url}/_sim/reset").json()["requests"] == 0
    assert len(sim.received) == 0 and http.get(f"{url}/_sim/requests").json() == []


async def test_request_log_is_bounded() -> None:
    sim = Simulator(SimulatorConfig(record_requests=2))
    for i in range(3):
        call = AsgiCall(orjson.dumps({"model": MODEL, "prompt": f"p{i}"}))
        await sim(scope("/v1/completions"), call.receive, call.send)
    assert [r.json()["prompt"] for r in sim.received] == ["p1", "p2"]


def test_counters_account_for_every_request(
    client: openai.OpenAI, url: str, sim: Simulator, http: httpx.Client
) -> None:
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="sim-error-429", messages=MESSAGES)
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="sim-error-midstream", messages=MESSAGES, stream=True))
    http.get(f"{url}/v1/unknown", headers=AUTH)
    # The server thread settles its counters just after the last byte leaves: wait for quiescence.
    wait_for(lambda: sim.stats.in_flight == 0, message="the simulator to finish its last request")
    s = sim.stats
    assert (s.requests, s.completed, s.errors, s.streams_started) == (5, 2, 3, 2)
    assert s.requests == s.completed + s.errors + s.cancelled + s.streams_cancelled + s.in_flight
