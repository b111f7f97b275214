"""Configuration, parsed once at start-up into a frozen :class:`Settings`.

Rule 1: nothing else in meter reads ``os.environ``. The CLI builds a Settings from the environment
        plus its flags (flags win) and hands it to the composition root.
Rule 2: an unknown ``METER_*`` variable or a malformed value fails start-up with a message naming the
        setting, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meter.errors import SettingsError

DEFAULT_UPSTREAM = "https://api.fireworks.ai/inference"
DEFAULT_DATABASE = "sqlite:///meter.db"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8787
    workers: int = 1
    upstream_url: str = DEFAULT_UPSTREAM
    database_url: str = DEFAULT_DATABASE
    key_secret: str | None = None  # HMAC secret for key fingerprints; generated beside a SQLite file if unset
    key_secret_file: str | None = None  # where the generated secret lives (default: beside the SQLite file)
    admin_token: str | None = None
    upstream_client: str = "aiohttp"  # "aiohttp" or "httpx"
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0  # between two chunks of the upstream's response
    upstream_max_connections: int = 1000
    observe_max_bytes: int = (
        64 * 1024 * 1024
    )  # bytes of a response meter inflates or parses (meter.tap.observer)
    observe_max_ratio: int = 100  # inflated bytes per compressed byte meter reads, past the first MiB
    max_request_bytes: int = 32 * 1024 * 1024
    client_body_timeout: float = 60.0  # seconds between two reads of a request body (then 408)
    shutdown_grace: float = 30.0  # seconds SIGTERM waits for in-flight requests
    # Client connections, per serving process (meter.serving.options; defaults after nginx's, reasons
    # in docs/security.md).
    max_request_head_bytes: int = 32 * 1024  # request line + header lines; then 431
    max_request_headers: int = 100  # header fields in one request; then 431
    client_header_timeout: float = 60.0  # seconds for a whole request head; then 408 (or a plain close)
    client_keepalive_timeout: float = 75.0  # seconds an idle kept-alive connection stays open
    client_send_timeout: float = 60.0  # seconds a client may leave meter's full write buffer unread
    max_client_connections: int = 1024  # open client connections; beyond them a new one gets 503
    log_level: str = "info"
    log_format: str = "auto"  # "json", "text", or "auto": text on a terminal, JSON otherwise
    # Every OTEL_* variable, for meter.sinks.otel_config (OpenTelemetry is off unless they configure an
    # exporter).
    otel_environment: dict[str, str] = dataclasses.field(default_factory=dict)
    # prometheus-client's multiprocess directory (PROMETHEUS_MULTIPROC_DIR; `meter serve --workers N`
    # points it at a fresh directory when unset).
    metrics_multiprocess_dir: str | None = None
    auto_migrate: bool = True  # migrate at start (SQLite: always sensible; PostgreSQL: docs/deployment.md)
    journal_dir: str | None = None  # None: "meter-journal" beside the SQLite file, else ./meter-journal
    journal_fsync: str = "100"  # milliseconds between group fsyncs, or "always"
    journal_segment_bytes: int = 64 * 1024 * 1024
    journal_min_free_bytes: int = 64 * 1024 * 1024  # /readyz fails below this much free disk
    writer_batch_size: int = 250  # peak RSS follows it: docs/performance.md
    writer_flush_interval: float = 0.05
    writer_concurrency: int | None = None  # batches in flight; None: 2 on PostgreSQL, 1 on SQLite
    retention_days: float | None = None  # delete raw usage events older than this (rollups are kept)
    unknown_keys: str = "allow"  # keys nobody registered: "allow" (team "unassigned") or "reject" (401)
    upstream_api_key: str | None = None  # sent upstream for virtual keys of teams without a credential
    upstream_credentials_file: str | None = None  # TOML of name = "secret": credentials teams can name
    price_file: str | None = None  # TOML price sheet overriding the shipped one (validated at start)
    key_directory_refresh: float = 2.0  # seconds between checks for admin changes made elsewhere
    # Quotas (meter.quota): counters in Redis when set (shared by replicas), else in this process.
    redis_url: str | None = None
    quota_prefix: str = "meter:quota:"  # Redis key prefix (several meters can share one Redis)
    quota_timeout: float = 0.5  # seconds a Redis call may take before the failure policy applies
    quota_max_connections: int = 32
    quota_server_time: bool = True  # rate windows on Redis' clock, so skewed replicas share one window
    quota_timezone: str = "UTC"  # where budget days, weeks and months begin
    quota_default_max_tokens: int = 4096  # output reserved for a request that sets no max_tokens
    quota_budget_failure: str = "closed"  # budgets when Redis is unavailable: "closed" (503) or "open"
    quota_rate_failure: str = "open"  # rate limits when Redis is unavailable
    quota_retry_store_after: float = 1.0  # seconds without Redis calls after a failure
    quota_lease_seconds: float = 900.0  # a reservation of a process that died is released after this
    quota_settle_linger: float = 0.005  # seconds a Redis settle waits to travel with the next reserve

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a ``sqlite:///path`` URL (None for in-memory or other databases)."""
        if not self.is_sqlite:
            return None
        path = self.database_url.split(":///", 1)[1] if ":///" in self.database_url else ""
        return Path(path) if path and path != ":memory:" else None


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be between 0 and 65535")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.query or parts.fragment or "@" in parts.netloc:
        # every forwarded URL is this base + the client's path (meter.forward.target); credentials belong in
        # METER_UPSTREAM_API_KEY or the credentials file, never in a URL that may be printed
        raise ValueError("must not carry credentials, a query or a fragment")
    return value.rstrip("/")


def _database_url(value: str) -> str:
    if not value.startswith(("sqlite", "postgresql", "postgres")):
        raise ValueError("must be a sqlite:/// or postgresql+asyncpg:// URL")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _fsync_policy(value: str) -> str:
    if value != "always":
        _positive_float(value)
    return value


def _redis_url(value: str) -> str:
    if urlsplit(value).scheme not in {"redis", "rediss", "unix"}:
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return value


def _timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("must be an IANA time zone name such as UTC or Europe/Berlin") from None
    return value


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _text(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


# environment variable -> (field, parser)
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "METER_HOST": ("host", _text),
    "METER_PORT": ("port", _port),
    "METER_WORKERS": ("workers", _positive_int),
    "METER_UPSTREAM_URL": ("upstream_url", _http_url),
    "METER_DATABASE_URL": ("database_url", _database_url),
    "METER_KEY_SECRET": ("key_secret", _text),
    "METER_KEY_SECRET_FILE": ("key_secret_file", _text),
    "METER_ADMIN_TOKEN": ("admin_token", _text),
    "METER_UPSTREAM_CLIENT": ("upstream_client", _choice("aiohttp", "httpx")),
    "METER_UPSTREAM_CONNECT_TIMEOUT": ("upstream_connect_timeout", _positive_float),
    "METER_UPSTREAM_READ_TIMEOUT": ("upstream_read_timeout", _positive_float),
    "METER_UPSTREAM_MAX_CONNECTIONS": ("upstream_max_connections", _positive_int),
    "METER_OBSERVE_MAX_BYTES": ("observe_max_bytes", _positive_int),
    "METER_OBSERVE_MAX_RATIO": ("observe_max_ratio", _positive_int),
    "METER_MAX_REQUEST_BYTES": ("max_request_bytes", _positive_int),
    "METER_CLIENT_BODY_TIMEOUT": ("client_body_timeout", _positive_float),
    "METER_SHUTDOWN_GRACE": ("shutdown_grace", _positive_float),
    "METER_MAX_REQUEST_HEAD_BYTES": ("max_request_head_bytes", _positive_int),
    "METER_MAX_REQUEST_HEADERS": ("max_request_headers", _positive_int),
    "METER_CLIENT_HEADER_TIMEOUT": ("client_header_timeout", _positive_float),
    "METER_CLIENT_KEEPALIVE_TIMEOUT": ("client_keepalive_timeout", _positive_float),
    "METER_CLIENT_SEND_TIMEOUT": ("client_send_timeout", _positive_float),
    "METER_MAX_CLIENT_CONNECTIONS": ("max_client_connections", _positive_int),
    "METER_LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error")),
    "METER_LOG_FORMAT": ("log_format", _choice("auto", "json", "text")),
    "METER_AUTO_MIGRATE": ("auto_migrate", _parse_bool),
    "METER_JOURNAL_DIR": ("journal_dir", _text),
    "METER_JOURNAL_FSYNC": ("journal_fsync", _fsync_policy),
    "METER_JOURNAL_SEGMENT_BYTES": ("journal_segment_bytes", _positive_int),
    "METER_JOURNAL_MIN_FREE_BYTES": ("journal_min_free_bytes", _positive_int),
    "METER_WRITER_BATCH_SIZE": ("writer_batch_size", _positive_int),
    "METER_WRITER_FLUSH_INTERVAL": ("writer_flush_interval", _positive_float),
    "METER_WRITER_CONCURRENCY": ("writer_concurrency", _positive_int),
    "METER_RETENTION_DAYS": ("retention_days", _positive_float),
    "METER_UNKNOWN_KEYS": ("unknown_keys", _choice("allow", "reject")),
    "METER_UPSTREAM_API_KEY": ("upstream_api_key", _text),
    "METER_UPSTREAM_CREDENTIALS_FILE": ("upstream_credentials_file", _text),
    "METER_PRICE_FILE": ("price_file", _text),
    "METER_KEY_DIRECTORY_REFRESH": ("key_directory_refresh", _positive_float),
    "METER_REDIS_URL": ("redis_url", _redis_url),
    "METER_QUOTA_PREFIX": ("quota_prefix", _text),
    "METER_QUOTA_TIMEOUT": ("quota_timeout", _positive_float),
    "METER_QUOTA_MAX_CONNECTIONS": ("quota_max_connections", _positive_int),
    "METER_QUOTA_SERVER_TIME": ("quota_server_time", _parse_bool),
    "METER_QUOTA_TIMEZONE": ("quota_timezone", _timezone),
    "METER_QUOTA_DEFAULT_MAX_TOKENS": ("quota_default_max_tokens", _non_negative_int),
    "METER_QUOTA_BUDGET_FAILURE": ("quota_budget_failure", _choice("closed", "open")),
    "METER_QUOTA_RATE_FAILURE": ("quota_rate_failure", _choice("open", "closed")),
    "METER_QUOTA_RETRY_STORE_AFTER": ("quota_retry_store_after", _positive_float),
    "METER_QUOTA_LEASE_SECONDS": ("quota_lease_seconds", _positive_float),
    "METER_QUOTA_SETTLE_LINGER": ("quota_settle_linger", _non_negative_float),
}

_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    field: (env, parser) for env, (field, parser) in ENVIRONMENT.items()
}


def load_settings(environ: Mapping[str, str], **overrides: Any) -> Settings:
    """Build Settings from ``METER_*`` variables, then ``overrides`` (CLI flags; ``None`` = not given).

    Override values may be strings (parsed like the variable) or already-typed values.
    """
    unknown = sorted(name for name in environ if name.startswith("METER_") and name not in ENVIRONMENT)
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]}; known settings: {', '.join(sorted(ENVIRONMENT))}")
    values: dict[str, Any] = {}
    for env, (field, parser) in ENVIRONMENT.items():
        if env in environ:
            values[field] = _parse(env, parser, environ[env])
    for field, value in overrides.items():
        if value is None:
            continue
        if field not in _PARSERS:
            raise SettingsError(f"unknown setting {field}")
        env, parser = _PARSERS[field]
        values[field] = _parse(f"{env} (or its flag)", parser, value) if isinstance(value, str) else value
    otel = {name: value for name, value in environ.items() if name.startswith("OTEL_")}
    if otel:
        from meter.errors import TelemetryConfigError
        from meter.sinks.otel_config import check_environment

        try:
            check_environment(otel)
        except TelemetryConfigError as exc:
            raise SettingsError(str(exc)) from None
        values["otel_environment"] = otel
    if environ.get("PROMETHEUS_MULTIPROC_DIR"):
        values["metrics_multiprocess_dir"] = environ["PROMETHEUS_MULTIPROC_DIR"]
    return dataclasses.replace(Settings(), **values)


def _parse(name: str, parser: Callable[[str], Any], raw: str) -> Any:
    try:
        return parser(raw)
    except ValueError as exc:
        raise SettingsError(f"invalid {name}={raw!r}: {exc}") from None
