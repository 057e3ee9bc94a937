import email.utils
import random

import msgspec
import pytest

from asyncgen.core.hints import parse_retry_after
from asyncgen.core.retry import RetryPolicy, Stop, interpret, retryable_status

OK = msgspec.json.encode(
    {
        "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    assert retryable_status(status)
    outcome = interpret(status, b'{"error": {"message": "busy", "type": "x", "code": null}}')
    assert outcome.retryable and outcome.error is not None
    assert outcome.error.status == status and outcome.error.message == "busy"
    assert outcome.error.code == f"http_{status}"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_are_permanent(status: int) -> None:
    body = b'{"error": {"message": "bad request: max_tokens too large", "code": "invalid_value"}}'
    outcome = interpret(status, body)
    assert not outcome.retryable
    assert outcome.error is not None
    assert outcome.error.code == "invalid_value"
    assert "max_tokens too large" in outcome.error.message


def test_vllm_flat_error_and_plain_text_error() -> None:
    vllm = b'{"object": "error", "message": "The model `x` does not exist.", "code": 404}'
    outcome = interpret(404, vllm)
    assert outcome.error is not None and "does not exist" in outcome.error.message
    outcome = interpret(502, b"<html>Bad Gateway</html>")
    assert outcome.retryable and outcome.error is not None
    assert "Bad Gateway" in outcome.error.message


def test_success_and_malformed_200() -> None:
    outcome = interpret(200, OK)
    assert outcome.completion is not None and outcome.error is None
    assert outcome.completion.choices[0].message is not None
    assert outcome.completion.choices[0].message.content == "hi"
    for body in (b"", b"   ", OK[: len(OK) // 2], b'{"id": "x"}', b'{"choices": []}', b"\xff\xfe"):
        bad = interpret(200, body)
        assert bad.completion is None and bad.retryable, body
        assert bad.error is not None and bad.error.code == "malformed_response"


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5", "retry-after-ms": "20"}) == 0.02
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-4"}) == 0.0
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=1_000_000.0) == pytest.approx(30.0)


def test_backoff_is_full_jitter_capped_and_bounded() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay=1.0, max_delay=8.0, deadline=1e9)
    rng = random.Random(1)
    for attempt in range(1, 10):
        ceiling = min(8.0, 2.0 ** (attempt - 1))
        delays = [policy.next_delay(attempt, 0.0, None, rng) for _ in range(200)]
        assert all(d is not None and 0.0 <= d <= ceiling for d in delays)
        # full jitter: spread over the whole range, not clustered at the ceiling
        assert min(d for d in delays if d is not None) < 0.2 * ceiling
        assert max(d for d in delays if d is not None) > 0.8 * ceiling
    assert policy.next_delay(10, 0.0, None, rng) is None, "attempts exhausted"


def test_server_hint_wins_and_deadline_bounds() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=2.0, deadline=100.0)
    rng = random.Random(2)
    delay = policy.next_delay(1, 0.0, 30.0, rng)
    assert delay is not None and 30.0 <= delay <= 33.0, "a server hint beyond the cap is honoured"
    assert policy.next_delay(1, 80.0, 30.0, rng) is None, "would pass the per-item deadline"


def test_uncounted_attempts_are_bounded_by_the_deadline_only() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=1.0, deadline=10.0)
    rng = random.Random(3)
    assert policy.next_delay(3, 1.0, None, rng) is None
    assert policy.next_delay(50, 1.0, 0.1, rng, counted=2) is not None, "47 were rate limits"
    assert policy.next_delay(50, 9.95, 0.1, rng, counted=0) is None, "past the deadline"
    assert policy.next_delay(50, 1.0, None, rng, counted=3) is None


def test_real_server_reply_shapes_are_accepted() -> None:
    """Fields real servers send beyond the minimum, or as null, do not make a reply malformed."""
    vllm_reasoning = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "Qwen/Qwen3-8B",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "42",
                    "reasoning_content": "think",
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 2,
            "total_tokens": 12,
            "prompt_tokens_details": None,
        },
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }
    gateway_nulls = {
        "choices": [{"message": {"content": None, "tool_calls": [{"id": "t"}]}}],
        "usage": {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
    }
    no_usage = {"choices": [{"text": "base model text", "finish_reason": "length"}], "usage": None}
    for reply in (vllm_reasoning, gateway_nulls, no_usage):
        outcome = interpret(200, msgspec.json.encode(reply))
        assert outcome.completion is not None, reply
    reasoning = interpret(200, msgspec.json.encode(vllm_reasoning)).completion
    assert reasoning is not None and reasoning.choices[0].message is not None
    assert reasoning.choices[0].message.reasoning_content == "think"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        # OpenAI: billing or spend limit, with the 429 status that otherwise means "later"
        (
            429,
            b'{"error": {"message": "You exceeded your current quota, please check your plan '
            b'and billing details.", "type": "insufficient_quota", "param": null, '
            b'"code": "insufficient_quota"}}',
        ),
        # a gateway that rewrote the code but kept the type
        (429, b'{"error": {"message": "quota", "type": "insufficient_quota", "code": "429"}}'),
        # one that kept the code and dropped the type, under another status
        (403, b'{"error": {"message": "no credits left", "code": "insufficient_quota"}}'),
    ],
)
def test_a_used_up_quota_stops_the_job_and_is_not_retried(status: int, body: bytes) -> None:
    outcome = interpret(status, body)
    assert outcome.stop is Stop.QUOTA
    assert not outcome.retryable
    assert outcome.error is not None and outcome.error.code == "insufficient_quota"


@pytest.mark.parametrize(
    ("status", "body", "stop"),
    [
        (401, b'{"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}', Stop.KEY),
        (403, b'{"error": {"message": "forbidden"}}', Stop.KEY),
        (
            404,
            b'{"error": {"message": "The model `gpt-9` does not exist or you do not have access '
            b'to it.", "type": "invalid_request_error", "code": "model_not_found"}}',
            Stop.MODEL,
        ),
        # vLLM's flat shape
        (
            404,
            b'{"object": "error", "message": "The model `x` does not exist.", "code": 404}',
            Stop.MODEL,
        ),
        # LiteLLM's proxy: a 400 for a model it does not serve
        (
            400,
            b'{"error": {"message": "{\'error\': \'/chat/completions: Invalid model name passed '
            b"in model=gpt-9. Call `/v1/models` to view available models for your key.'}\", "
            b'"type": "None", "param": "None", "code": "400"}}',
            Stop.MODEL,
        ),
        (400, b'{"error": {"message": "max_tokens is too large", "code": null}}', None),
        (429, b'{"error": {"message": "Rate limit reached for requests"}}', None),
        (500, b"Internal Server Error", None),
    ],
)
def test_answers_every_request_would_get(status: int, body: bytes, stop: Stop | None) -> None:
    assert interpret(status, body).stop is stop
