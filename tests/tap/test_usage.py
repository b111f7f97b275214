"""Usage extraction: both usage namings, garbage tolerance, Fireworks metrics, the prompt estimate."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meter.records import Usage
from meter.tap.estimate import chars_to_tokens, estimate_prompt_tokens
from meter.tap.fireworks_headers import FireworksMetrics, fireworks_metrics, perf_metrics
from meter.tap.usage import Endpoint, ResponseFacts, endpoint_of, error_message, usage_from_json

# --- usage objects ----------------------------------------------------------------------------------


def test_chat_usage_with_details() -> None:
    usage = usage_from_json(
        {
            "prompt_tokens": 1200,
            "completion_tokens": 45,
            "total_tokens": 1245,
            "prompt_tokens_details": {"cached_tokens": 128, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 20},
        }
    )
    assert usage == Usage(1200, 45, 128, 20, 1245)


def test_responses_usage_naming() -> None:
    usage = usage_from_json(
        {
            "input_tokens": 36,
            "input_tokens_details": {"cached_tokens": 4},
            "output_tokens": 9,
            "output_tokens_details": {"reasoning_tokens": 2},
            "total_tokens": 45,
        }
    )
    assert usage == Usage(36, 9, 4, 2, 45)


def test_fireworks_chat_naming_inside_responses() -> None:
    assert usage_from_json({"prompt_tokens": 50, "completion_tokens": 6, "total_tokens": 56}) == Usage(
        50, 6, None, None, 56
    )


def test_missing_fields_stay_none_and_total_is_not_invented() -> None:
    assert usage_from_json({"prompt_tokens": 8, "total_tokens": 8}) == Usage(8, None, None, None, 8)
    assert usage_from_json({"prompt_tokens": 3, "completion_tokens": 4}) == Usage(3, 4, None, None, None)


def test_zero_is_reported_not_missing() -> None:
    assert usage_from_json({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}) == Usage(
        0, 0, None, None, 0
    )


@pytest.mark.parametrize("bad", [True, False, 1.5, 2.0, "12", None, -1, [], {}])
def test_garbage_values_become_none(bad: object) -> None:
    usage = usage_from_json(
        {
            "prompt_tokens": bad,
            "completion_tokens": 7,
            "total_tokens": bad,
            "prompt_tokens_details": {"cached_tokens": bad},
            "completion_tokens_details": bad,
        }
    )
    assert usage == Usage(None, 7, None, None, None)


def test_chat_naming_wins_over_responses_naming_when_both_present_but_falls_back_per_field() -> None:
    usage = usage_from_json(
        {"prompt_tokens": 10, "input_tokens": 11, "completion_tokens": "x", "output_tokens": 3}
    )
    assert usage == Usage(10, 3, None, None, None)


@pytest.mark.parametrize("obj", [None, 12, "usage", [], {}, {"unrelated": 1}, {"prompt_tokens": None}])
def test_nothing_usable_is_none(obj: object) -> None:
    assert usage_from_json(obj) is None


# --- endpoints --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", Endpoint.CHAT_COMPLETIONS),
        ("/chat/completions", Endpoint.CHAT_COMPLETIONS),
        ("/inference/v1/chat/completions", Endpoint.CHAT_COMPLETIONS),
        ("/v1/chat/completions/", Endpoint.CHAT_COMPLETIONS),
        ("chat/completions?x=1", Endpoint.CHAT_COMPLETIONS),
        ("/v1/completions", Endpoint.COMPLETIONS),
        ("/inference/v1/completions", Endpoint.COMPLETIONS),
        ("/v1/embeddings", Endpoint.EMBEDDINGS),
        ("/embeddings", Endpoint.EMBEDDINGS),
        ("/v1/responses", Endpoint.RESPONSES),
        ("/inference/v1/responses", Endpoint.RESPONSES),
        ("/v1/models", Endpoint.OTHER),
        ("/v1/responses/resp_123", Endpoint.OTHER),
        ("/v1/mycompletions", Endpoint.OTHER),
        ("", Endpoint.OTHER),
    ],
)
def test_endpoint_of(path: str, endpoint: Endpoint) -> None:
    assert endpoint_of(path) is endpoint


# --- Fireworks headers and perf_metrics ------------------------------------------------------------


def test_fireworks_headers() -> None:
    metrics = fireworks_metrics(
        {
            "content-type": "application/json",
            "fireworks-prompt-tokens": "23",
            "fireworks-cached-prompt-tokens": "16",
            "fireworks-server-time-to-first-token": "0.1214",
            "fireworks-server-processing-time": "0.2458",
            "fireworks-prefill-duration": "0.0503",
            "fireworks-num-concurrent-requests": "4",
            "fireworks-deployment": "accounts/fireworks/deployments/3f9a2c1b",
            "fireworks-speculation-acceptance": "0.8,0.6",
            "fireworks-weird": "nan",
            "x-fireworks-prompt-tokens": "999",
        }
    )
    assert metrics == FireworksMetrics(
        prompt_tokens=23,
        cached_tokens=16,
        server_ttft_s=0.1214,
        server_processing_s=0.2458,
        other={"prefill-duration": 0.0503, "num-concurrent-requests": 4.0},
    )


def test_fireworks_token_headers_must_be_whole_numbers() -> None:
    metrics = fireworks_metrics({"fireworks-prompt-tokens": "12.5", "fireworks-cached-prompt-tokens": "-3"})
    assert metrics.prompt_tokens is None
    assert metrics.cached_tokens is None


def test_no_fireworks_headers() -> None:
    assert fireworks_metrics({"content-type": "text/event-stream"}) == FireworksMetrics()


def test_perf_metrics_numbers_and_numeric_strings() -> None:
    metrics = perf_metrics(
        {
            "prompt-tokens": 26,
            "cached-prompt-tokens": 16.0,
            "server-time-to-first-token": "0.0852",
            "server-processing-time": 0.4123,
            "speculation-acceptance": "0.75",
            "deployment": "accounts/x/deployments/y",
            "flag": True,
            "nested": {"a": 1},
        }
    )
    assert metrics == FireworksMetrics(26, 16, 0.0852, 0.4123, {"speculation-acceptance": 0.75})
    assert perf_metrics(None) == FireworksMetrics()
    assert perf_metrics([1, 2]) == FireworksMetrics()


def test_perf_metrics_win_over_headers() -> None:
    headers = FireworksMetrics(
        26, 0, 0.09, 0.5, {"speculation-acceptance": 0.5, "num-concurrent-requests": 3.0}
    )
    perf = FireworksMetrics(None, 16, 0.0852, None, {"speculation-acceptance": 0.75})
    assert perf.over(headers) == FireworksMetrics(
        26, 16, 0.0852, 0.5, {"speculation-acceptance": 0.75, "num-concurrent-requests": 3.0}
    )


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "error_body", "message"),
    [
        (
            {"error": {"object": "error", "type": "invalid_request_error", "message": "too long"}},
            True,
            "too long",
        ),
        ({"error": {"type": "server_error", "message": ""}}, False, "server_error"),
        ({"error": {"code": 500}}, False, "error"),
        ({"error": "rate limited"}, False, "rate limited"),
        ({"type": "error", "code": "server_error", "message": "boom"}, False, "boom"),
        ({"detail": "Model not found"}, True, "Model not found"),
        ({"detail": [{"loc": ["body"], "msg": "bad"}]}, True, "[{'loc': ['body'], 'msg': 'bad'}]"),
        ({"message": "Unauthorized"}, True, "Unauthorized"),
        ({"message": "an ordinary field"}, False, None),
        ({"error": None, "id": "x"}, False, None),
        ({}, True, None),
    ],
)
def test_error_message(obj: dict[str, Any], error_body: bool, message: str | None) -> None:
    assert error_message(obj, error_body=error_body) == message


def test_error_message_is_cut_short() -> None:
    message = error_message({"error": {"message": "x" * 10_000}})
    assert message == "x" * 1023 + "…"  # meter.bounds.ERROR, marked as cut


# --- accumulation ------------------------------------------------------------------------------------


def chunk(
    index: int, content: str | None = None, finish: str | None = None, usage: object = None
) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "c1",
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        "usage": usage,
    }


def test_n_gt_1_repeated_cumulative_usage_is_counted_once() -> None:
    facts = ResponseFacts()
    usage = {"prompt_tokens": 12, "completion_tokens": 14, "total_tokens": 26}
    assert facts.add_chunk(chunk(0, "Red")) == 3
    assert facts.add_chunk(chunk(1, "Green")) == 5
    facts.add_chunk(chunk(1, finish="length", usage=usage))
    facts.add_chunk(chunk(0, finish="stop", usage=usage))
    assert facts.usage == Usage(12, 14, None, None, 26)
    assert facts.ordered_finish_reasons() == ("stop", "length")
    assert facts.content_chars == 8


def test_latest_usage_wins_and_null_usage_does_not_erase_it() -> None:
    facts = ResponseFacts()
    facts.add_chunk(chunk(0, usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}))
    facts.add_chunk(chunk(0, usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}))
    facts.add_chunk(chunk(0, "x"))
    assert facts.usage == Usage(5, 2, None, None, 7)


def test_mid_stream_error_chunk() -> None:
    facts = ResponseFacts()
    facts.add_chunk(chunk(0, "Once"))
    facts.add_chunk({"error": {"object": "error", "type": "internal_server_error", "message": "interrupted"}})
    assert facts.stream_error
    assert facts.error_message == "interrupted"
    assert facts.response_id == "c1"


def test_completions_text_and_tool_arguments_and_reasoning_count_as_content() -> None:
    facts = ResponseFacts()
    assert facts.add_chunk({"choices": [{"index": 0, "text": " upon", "finish_reason": None}]}) == 5
    delta = {
        "reasoning_content": "hm",
        "tool_calls": [
            {"index": 0, "function": {"name": "f", "arguments": '{"a":1}'}},
            "junk",
            {"function": 3},
        ],
    }
    assert facts.add_chunk({"choices": [{"index": 0, "delta": delta}]}) == 2 + 7


def test_responses_events() -> None:
    facts = ResponseFacts()
    created = {
        "type": "response.created",
        "response": {"id": "resp_1", "model": "m", "status": "in_progress"},
    }
    assert facts.add_event("response.created", created) == 0
    assert facts.add_event("response.output_text.delta", {"delta": "Hi"}) == 2  # type from the event line
    assert facts.add_event(None, {"type": "response.function_call_arguments.delta", "delta": "{}"}) == 2
    assert facts.add_event(None, {"type": "response.audio.delta", "delta": "UklGRg=="}) == 0
    assert facts.add_event(None, {"type": "response.output_text.done", "text": "Hi"}) == 0
    completed = {
        "type": "response.completed",
        "response": {"id": "resp_1", "status": "completed", "usage": {"input_tokens": 3, "output_tokens": 2}},
    }
    facts.add_event("response.completed", completed)
    assert (facts.response_id, facts.response_model) == ("resp_1", "m")
    assert facts.usage == Usage(3, 2, None, None, None)
    assert facts.ordered_finish_reasons() == ("completed",)
    assert not facts.stream_error


def test_body_shapes() -> None:
    facts = ResponseFacts()
    facts.add_body(
        Endpoint.OTHER, {"object": "response", "id": "r", "status": "failed", "error": {"message": "x"}}
    )
    assert (facts.response_id, facts.error_message, facts.stream_error) == ("r", "x", False)
    assert facts.ordered_finish_reasons() == ("failed",)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "model",
                    "choices",
                    "delta",
                    "message",
                    "content",
                    "text",
                    "usage",
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "input_tokens",
                    "prompt_tokens_details",
                    "cached_tokens",
                    "finish_reason",
                    "index",
                    "tool_calls",
                    "function",
                    "arguments",
                    "error",
                    "message",
                    "type",
                    "response",
                    "status",
                    "incomplete_details",
                    "reason",
                    "output",
                    "summary",
                    "perf_metrics",
                    "detail",
                    "reasoning_content",
                    "function_call",
                    "object",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@given(
    JSON, st.sampled_from(list(Endpoint)), st.sampled_from([None, "error", "response.completed", "x.delta"])
)
def test_any_json_shape_is_tolerated(obj: object, endpoint: Endpoint, name: str | None) -> None:
    facts = ResponseFacts()
    facts.add_chunk(obj)
    facts.add_event(name, obj)
    facts.add_body(endpoint, obj, error_body=True)
    estimate_prompt_tokens(obj)
    assert facts.content_chars >= 0


# --- prompt estimate -----------------------------------------------------------------------------------


def test_chars_to_tokens() -> None:
    assert [chars_to_tokens(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_estimate_chat_messages() -> None:
    request = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are terse."},  # 14
            {"role": "user", "content": [{"type": "text", "text": "Hi there"}, {"type": "image_url"}]},  # 8
            {"role": "assistant", "content": None},
        ],
    }
    assert estimate_prompt_tokens(request) == 6  # ceil(22 / 4)


def test_estimate_completions_prompt() -> None:
    assert estimate_prompt_tokens({"prompt": "Once upon a"}) == 3  # 11 chars
    assert estimate_prompt_tokens({"prompt": ["abcd", "efgh"]}) == 2
    assert estimate_prompt_tokens({"prompt": [101, 2023, 102]}) == 3  # token ids count one each
    assert estimate_prompt_tokens({"prompt": [[1, 2], [3]]}) == 3


def test_estimate_embeddings_and_responses_input() -> None:
    assert estimate_prompt_tokens({"input": "hello world"}) == 3
    assert estimate_prompt_tokens({"input": ["a", "bcd"]}) == 1
    request = {
        "instructions": "Be brief.",  # 9
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},  # 8
            {"type": "function_call", "arguments": '{"c":1}'},  # 7
            {"type": "function_call_output", "output": "sunny"},  # 5
        ],
    }
    assert estimate_prompt_tokens(request) == 8  # ceil(29 / 4)


def test_estimate_without_prompt_fields_is_none() -> None:
    assert estimate_prompt_tokens({"model": "m"}) is None
    assert estimate_prompt_tokens([]) is None
    assert estimate_prompt_tokens({"messages": []}) == 0
