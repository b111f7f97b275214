"""Small steps of deploy/local/*.sh that are easier in Python than in bash.

Runs with the Python that has meter installed (it uses asyncpg and redis, meter's own dependencies):

    python helper.py wait-http URL [--timeout S] [--pid PID]   until URL answers 2xx (fails early if PID dies)
    python helper.py port-free PORT...                          fails naming the first port in use
    python helper.py create-database URL                        CREATE DATABASE unless it exists
    python helper.py ping-redis URL                             fails unless Redis answers
    python helper.py token                                      a random URL-safe secret
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit


def wait_http(url: str, timeout: float, pid: int | None) -> int:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            print(f"process {pid} exited before {url} answered", file=sys.stderr)
            return 1
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if 200 <= response.status < 300:
                    return 0
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.1)
    print(f"{url} not ready after {timeout:g} s ({last})", file=sys.stderr)
    return 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def port_free(ports: list[int]) -> int:
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                print(f"port {port} is in use", file=sys.stderr)
                return 1
    return 0


def create_database(url: str) -> int:
    import asyncpg  # type: ignore[import-untyped]

    parts = urlsplit(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    name = parts.path.lstrip("/")
    if not name:
        print(f"{url}: no database name", file=sys.stderr)
        return 1
    admin = urlunsplit(parts._replace(path="/postgres"))

    async def run() -> None:
        conn = await asyncpg.connect(admin, timeout=5)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
                print(f"created database {name}")
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except Exception as exc:
        print(
            f"PostgreSQL at {parts.hostname}:{parts.port or 5432}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def ping_redis(url: str) -> int:
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3).ping()
    except Exception as exc:
        print(f"Redis at {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="helper.py")
    commands = parser.add_subparsers(dest="command", required=True)
    wait = commands.add_parser("wait-http")
    wait.add_argument("url")
    wait.add_argument("--timeout", type=float, default=30.0)
    wait.add_argument("--pid", type=int, default=None)
    free = commands.add_parser("port-free")
    free.add_argument("ports", type=int, nargs="+")
    create = commands.add_parser("create-database")
    create.add_argument("url")
    ping = commands.add_parser("ping-redis")
    ping.add_argument("url")
    commands.add_parser("token")
    args = parser.parse_args()
    if args.command == "wait-http":
        return wait_http(args.url, args.timeout, args.pid)
    if args.command == "port-free":
        return port_free(args.ports)
    if args.command == "create-database":
        return create_database(args.url)
    if args.command == "ping-redis":
        return ping_redis(args.url)
    print(secrets.token_urlsafe(32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
