"""``python -m meter.simulator``: serve a simulator with uvicorn (httptools + uvloop)."""

from __future__ import annotations

import argparse

import uvicorn

from .app import create_simulator
from .config import SimulatorConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meter.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--record-requests", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        config = SimulatorConfig(
            ttft_ms=args.ttft_ms,
            token_delay_ms=args.token_delay_ms,
            completion_tokens=args.completion_tokens,
            record_requests=args.record_requests,
        )
    except ValueError as exc:
        parser.error(str(exc))
    serve(config, args.host, args.port)


def serve(config: SimulatorConfig, host: str, port: int) -> None:
    """Serve a simulator until interrupted (``meter simulate`` and ``python -m meter.simulator``)."""
    from meter.serving.gc import settle_collector

    app = create_simulator(config)
    settle_collector(None)  # the benchmark's upstream: its collector's pauses would count against meter
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
        # as a provider's load balancer does (60 s and more): longer than a client pool keeps an idle
        # connection (aiohttp: 15 s), so no request races the server closing the connection under it
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
