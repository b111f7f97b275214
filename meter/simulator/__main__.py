"""``python -m meter.simulator``: serve a simulator with uvicorn (httptools + uvloop when available)."""

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
    uvicorn.run(
        create_simulator(config),
        host=args.host,
        port=args.port,
        loop="auto",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
