"""The real openai SDK, sync and async, streaming and not, through meter against the simulator: the client
sees what it sees directly, and the stored records carry the right numbers."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from meter.simulator import count_prompt_tokens

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you today"}]
VOLATILE = {"id", "created"}


def strip(obj: Any) -> Any:
    """Drop fields that differ between any two calls (ids, timestamps)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def clients(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="fw-test-key-0123456789abcdef-0001", max_retries=0)


def test_chat_non_streaming_equals_direct(meter, simulator):
    direct = clients(f"{simulator.url}/v1").chat.completions.create(
        model="llama-v3p1-8b", messages=MESSAGES, max_tokens=5
    )
    via = clients(meter.base_url).chat.completions.create(
        model="llama-v3p1-8b", messages=MESSAGES, max_tokens=5
    )
    assert strip(via.model_dump()) == strip(direct.model_dump())
    row = meter.rows(1)[0]
    expected_prompt = count_prompt_tokens({"messages": MESSAGES})
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["requested_model"] == "llama-v3p1-8b"
    assert row["response_model"] == via.model
    assert row["response_id"] == via.id
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        expected_prompt,
        5,
        expected_prompt + 5,
    )
    assert row["usage_source"] == "reported"
    assert row["outcome"] == "ok" and row["status_code"] == 200 and row["stream"] == 0
    assert row["finish_reason"] == "length"
    assert row["key_suffix"] == "...0001"
    assert (
        len(row["key_fingerprint"]) == 64
        and "fw-test-key-0123456789abcdef-0001" not in row["key_fingerprint"]
    )
    assert row["server_ttft_ms"] is not None and row["server_processing_ms"] is not None
    assert row["duration_ms"] > 0 and row["overhead_ms"] >= 0


def test_chat_streaming_equals_direct(meter, simulator):
    def collect(base_url: str) -> list[dict[str, Any]]:
        stream = clients(base_url).chat.completions.create(
            model="llama-v3p1-8b", messages=MESSAGES, max_tokens=6, stream=True
        )
        return [strip(chunk.model_dump()) for chunk in stream]

    assert collect(meter.base_url) == collect(f"{simulator.url}/v1")
    row = meter.rows(1)[0]
    expected_prompt = count_prompt_tokens({"messages": MESSAGES})
    assert row["stream"] == 1 and row["outcome"] == "ok"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (expected_prompt, 6)
    assert row["usage_source"] == "reported"
    assert row["ttft_ms"] is not None and row["output_tokens_per_second"] > 0


def test_include_usage_chunk_and_n_greater_than_one_count_once(meter):
    client = clients(meter.base_url)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=3,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    row = meter.rows(1)[0]
    assert row["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert row["prompt_tokens"] == chunks[-1].usage.prompt_tokens
    assert row["finish_reason"] == "length,length"


async def test_async_client_all_endpoints(meter, simulator):
    client = openai.AsyncOpenAI(base_url=meter.base_url, api_key="fw-async-key-9999", max_retries=0)
    chat = await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=4)
    completion = await client.completions.create(model="m2", prompt="one two three", max_tokens=3)
    embedding = await client.embeddings.create(model="nomic-ai/nomic-embed-text-v1.5", input=["a b", "c"])
    response = await client.responses.create(model="m3", input="tell me a story", max_output_tokens=5)
    stream = await client.responses.create(
        model="m3", input="tell me a story", max_output_tokens=5, stream=True
    )
    events = [event async for event in stream]
    stream_chat = await client.chat.completions.create(
        model="m1", messages=MESSAGES, max_tokens=2, stream=True
    )
    _ = [c async for c in stream_chat]
    await client.close()
    rows = {(r["endpoint"], r["stream"]): r for r in meter.rows(6)}
    assert rows[("/v1/chat/completions", 0)]["completion_tokens"] == chat.usage.completion_tokens == 4
    assert rows[("/v1/completions", 0)]["prompt_tokens"] == completion.usage.prompt_tokens
    assert rows[("/v1/embeddings", 0)]["prompt_tokens"] == embedding.usage.prompt_tokens
    assert rows[("/v1/embeddings", 0)]["completion_tokens"] is None
    assert rows[("/v1/responses", 0)]["completion_tokens"] == response.usage.output_tokens == 5
    completed = next(e for e in events if e.type == "response.completed")
    assert rows[("/v1/responses", 1)]["prompt_tokens"] == completed.response.usage.input_tokens
    assert rows[("/v1/responses", 1)]["completion_tokens"] == 5
    assert all(r["usage_source"] == "reported" for r in rows.values())
    assert rows[("/v1/chat/completions", 1)]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "code, exc",
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (404, openai.NotFoundError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_upstream_errors_pass_through_and_are_recorded(meter, simulator, code, exc):
    def call(base_url: str) -> openai.APIStatusError:
        with pytest.raises(exc) as info:
            clients(base_url).chat.completions.create(model=f"sim-error-{code}", messages=MESSAGES)
        return info.value

    via, direct = call(meter.base_url), call(f"{simulator.url}/v1")
    assert via.status_code == direct.status_code == code
    assert via.body == direct.body
    row = meter.rows(1)[0]
    assert row["status_code"] == code and row["outcome"] == "upstream_error"
    assert row["error"]


def test_midstream_error_event_is_relayed_and_recorded(meter):
    client = clients(meter.base_url)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="sim-error-midstream", messages=MESSAGES, stream=True):
            pass
    row = meter.rows(1)[0]
    assert row["outcome"] == "upstream_error" and row["status_code"] == 200
    assert row["error"]


def test_perf_metrics_and_fireworks_headers_are_recorded(meter):
    raw = httpx.post(
        f"{meter.base_url}/chat/completions",
        json={"model": "m", "messages": MESSAGES, "max_tokens": 2, "perf_metrics_in_response": True},
        headers={"Authorization": "Bearer fw-x"},
    )
    assert raw.status_code == 200 and "perf_metrics" in raw.json()
    row = meter.rows(1)[0]
    import json

    metrics = json.loads(row["upstream_metrics"])
    assert metrics and all(isinstance(v, (int, float)) for v in metrics.values())


def test_many_concurrent_requests_each_recorded_once(meter):
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=meter.base_url, api_key="fw-load", max_retries=0)

        async def one(i: int) -> None:
            if i % 2:
                stream = await client.chat.completions.create(
                    model="m", messages=MESSAGES, max_tokens=3, stream=True
                )
                _ = [c async for c in stream]
            else:
                await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)

        await asyncio.gather(*(one(i) for i in range(200)))
        await client.close()

    asyncio.run(run())
    rows = meter.rows(200)
    assert len({r["event_id"] for r in rows}) == 200
    assert all(r["completion_tokens"] == 3 and r["outcome"] == "ok" for r in rows)
