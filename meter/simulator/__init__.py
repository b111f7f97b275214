"""meter's Fireworks-compatible upstream simulator, for demos, the test suite and load benchmarks.

It answers Fireworks' OpenAI-compatible inference API (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/responses``, ``/v1/models``, also under ``/inference/v1/...``) with
deterministic text and token counts, Fireworks' response headers and stream shapes, configurable
latency, injected errors, and client-disconnect detection, and records what it received.

Layout, in the order a request meets it:

- :mod:`.app`     the ASGI application: routing, authentication, timing, streaming, inspection
- :mod:`.config`  its configuration, counters and request log
- :mod:`.asgi`    ASGI plumbing: body, JSON answers, lifespan, disconnect watch
- :mod:`.plan`    body and ``x-sim-*`` headers -> what to answer (pure)
- :mod:`.tokens`  the deterministic token rules: :func:`count_prompt_tokens` (pure)
- :mod:`.shapes`  JSON bodies, SSE events and headers in Fireworks' shapes (pure)
- :mod:`.faults`  error bodies and error injection (pure)

Run one: ``python -m meter.simulator --port 9000 --ttft-ms 50 --token-delay-ms 10``.
"""

from __future__ import annotations

from .app import Simulator, create_simulator
from .config import ReceivedRequest, SimulatorConfig, SimulatorStats
from .faults import MIDSTREAM_TOKENS
from .plan import FIREWORKS_MODEL_PREFIX
from .tokens import PER_MESSAGE_TOKENS, completion_text, count_prompt_tokens

__all__ = [
    "FIREWORKS_MODEL_PREFIX",
    "MIDSTREAM_TOKENS",
    "PER_MESSAGE_TOKENS",
    "ReceivedRequest",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "completion_text",
    "count_prompt_tokens",
    "create_simulator",
]
