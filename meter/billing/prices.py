"""Prices and cost: pure arithmetic over Decimal, no I/O.

Rule 1 (money is exact): prices are ``Decimal`` USD per 1,000,000 tokens. A request's cost is computed
        exactly, then rounded ONCE, half-even, to whole nano-USD (1e-9 USD) — the unit stored in the
        database (``cost_nanos``). Every total is the exact sum of stored per-request values, so a report
        always equals the sum of its rows. Nothing here ever uses float.
Rule 2 (cached tokens): providers count cached prompt tokens inside ``prompt_tokens``; they are billed at
        the cached-input price, the rest of the prompt at the input price. Reasoning tokens are inside
        ``completion_tokens`` and billed as output.
Rule 3 (dated): a price row applies from ``effective_from`` (inclusive) until the next row for the same
        model starts. A request is priced by the row in force at its ``started_at``.
Rule 4 (unpriced is not free): no applicable row gives ``None``, never ``Decimal(0)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from meter.records import Usage

MILLION = Decimal(1_000_000)
NANOS_PER_USD = Decimal(1_000_000_000)
NANO = Decimal("1e-9")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens. ``cached_input`` defaults to ``input`` when a sheet gives no cached price."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Decimal) or not value.is_finite() or value < 0):
                raise ValueError(f"price {name} must be a non-negative Decimal, got {value!r}")


@dataclass(frozen=True, slots=True)
class PriceRow:
    """One dated row of the catalog. ``model`` is an exact model name, or ``tier:<name>`` for a fallback."""

    model: str
    price: Price
    effective_from: datetime
    source: str = ""
    id: int | None = None  # the database id once stored; records point at it


def compute_cost(usage: Usage, price: Price) -> Decimal | None:
    """Exact USD cost of ``usage`` at ``price``, rounded half-even to nano-USD; None if nothing counted."""
    prompt = usage.prompt_tokens or 0
    completion = usage.completion_tokens or 0
    cached = min(usage.cached_tokens or 0, prompt)
    if usage.prompt_tokens is None and usage.completion_tokens is None:
        return None
    cached_price = price.cached_input if price.cached_input is not None else price.input
    exact = ((prompt - cached) * price.input + cached * cached_price + completion * price.output) / MILLION
    return exact.quantize(NANO, rounding=ROUND_HALF_EVEN)


def to_nanos(usd: Decimal) -> int:
    """Whole nano-USD of an already-rounded amount (see Rule 1)."""
    nanos = usd * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise ValueError(f"{usd} is not a whole number of nano-USD; round with compute_cost first")
    return int(nanos)


def from_nanos(nanos: int) -> Decimal:
    return (Decimal(nanos) / NANOS_PER_USD).quantize(NANO)


# Model size from its name: "llama-v3p1-8b-instruct" → 8, "mixtral-8x22b" → 176 (MoE), "qwen3-30b-a3b"
# → 30 (MoE: total parameters, "a3b" is the active count). "p" is Fireworks' decimal point ("3p8b").
_SIZE = re.compile(r"(?<![a-z0-9])(?:(\d+)x)?(\d+(?:p\d+)?)b(?![a-z0-9])")
_ACTIVE = re.compile(r"(?<![a-z0-9])a\d+(?:p\d+)?b(?![a-z0-9])")
_EMBEDDING = re.compile(r"embed|bge|gte|e5-|minilm|nomic")


@dataclass(frozen=True, slots=True)
class ModelSize:
    billions: Decimal
    moe: bool


def model_size(model: str) -> ModelSize | None:
    name = model.rsplit("/", 1)[-1].lower()
    found = _SIZE.findall(name)
    if not found:
        return None
    experts, size = found[0]
    billions = Decimal(size.replace("p", "."))
    if experts:
        return ModelSize(billions * int(experts), moe=True)
    return ModelSize(billions, moe=bool(_ACTIVE.search(name)))


def size_tier(model: str) -> str | None:
    """Fireworks' serverless size-tier fallback for a model without its own price row.

    Text models: under 4B, 4B-16B, over 16B; mixture-of-experts: up to 56B and 56.1B-176B total. Embedding
    models: up to 150M and 150M-350M parameters. None when the name does not tell the size.
    """
    name = model.rsplit("/", 1)[-1].lower()
    if _EMBEDDING.search(name):
        millions = re.search(r"(?<![a-z0-9])(\d+)m(?![a-z0-9])", name)
        if millions is None:
            return "embedding-up-to-150m" if "small" in name or "nomic" in name else None
        return "embedding-up-to-150m" if int(millions.group(1)) <= 150 else "embedding-150m-350m"
    size = model_size(model)
    if size is None:
        return None
    if size.moe:
        if size.billions <= 56:
            return "moe-up-to-56b"
        if size.billions <= 176:
            return "moe-56b-176b"
        return None
    if size.billions < 4:
        return "under-4b"
    if size.billions <= 16:
        return "4b-16b"
    return "over-16b"


class PriceCatalog:
    """An immutable view of dated price rows with lookup by model and time (see Rules 3 and 4).

    Lookup order: the model's own rows (exact name, then the last path segment, so both
    ``accounts/fireworks/models/x`` and ``x`` match), then its size tier's rows.
    """

    def __init__(self, rows: Iterable[PriceRow]) -> None:
        by_model: dict[str, list[PriceRow]] = {}
        for row in rows:
            by_model.setdefault(row.model, []).append(row)
        self._rows = {
            model: sorted(group, key=lambda r: r.effective_from) for model, group in by_model.items()
        }

    @property
    def rows(self) -> Sequence[PriceRow]:
        return [row for group in self._rows.values() for row in group]

    def lookup(self, model: str | None, at: datetime) -> PriceRow | None:
        if not model:
            return None
        for key in self._candidates(model):
            row = self._in_force(key, at)
            if row is not None:
                return row
        return None

    def _candidates(self, model: str) -> list[str]:
        keys = [model]
        short = model.rsplit("/", 1)[-1]
        if short != model:
            keys.append(short)
        else:
            keys.append(f"accounts/fireworks/models/{model}")
        tier = size_tier(model)
        if tier is not None:
            keys.append(f"tier:{tier}")
        return keys

    def _in_force(self, key: str, at: datetime) -> PriceRow | None:
        found = None
        for row in self._rows.get(key, ()):
            if row.effective_from <= at:
                found = row
            else:
                break
        return found


def _decimal(value: object, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        # floats are refused on purpose: "0.1" as a float is not 0.1
        raise ValueError(f'{where}: prices must be strings or integers (e.g. "0.20"), got {value!r}')
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if not number.is_finite() or number < 0:
        raise ValueError(f"{where}: {value!r} must be a non-negative number")
    return number


def _timestamp(value: object, where: str) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not an ISO 8601 datetime") from None
    else:
        raise ValueError(f"{where}: {value!r} is not an ISO 8601 datetime")
    if parsed.tzinfo is None:
        raise ValueError(f"{where}: {value!r} needs a UTC offset (e.g. 2025-08-01T00:00:00Z)")
    return parsed


def parse_price_sheet(data: dict[str, object]) -> list[PriceRow]:
    """Rows of a price sheet (the TOML layout of ``meter/billing/data/fireworks_prices.toml``), validated.

    Raises ValueError naming the offending entry, so a bad file fails at start, not at the first request.
    """
    default_from = _timestamp(data.get("effective_from"), "effective_from")
    source = str(data.get("source", ""))
    rows: list[PriceRow] = []
    for section, prefix in (("tiers", "tier:"), ("models", "")):
        entries = data.get(section, {})
        if not isinstance(entries, dict):
            raise ValueError(f"[{section}] must be a table")
        for name, entry in entries.items():
            where = f"[{section}] {name!r}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected {{ input = ..., output = ... }}")
            unknown = set(entry) - {"input", "output", "cached_input", "effective_from"}
            if unknown:
                raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
            if "input" not in entry or "output" not in entry:
                raise ValueError(f"{where}: input and output prices are required")
            price = Price(
                input=_decimal(entry["input"], f"{where} input"),
                output=_decimal(entry["output"], f"{where} output"),
                cached_input=(
                    _decimal(entry["cached_input"], f"{where} cached_input")
                    if "cached_input" in entry
                    else None
                ),
            )
            effective = (
                _timestamp(entry["effective_from"], f"{where} effective_from")
                if "effective_from" in entry
                else default_from
            )
            rows.append(PriceRow(model=prefix + name, price=price, effective_from=effective, source=source))
    return rows


def load_price_file(path: str) -> list[PriceRow]:
    import tomllib

    with open(path, "rb") as handle:
        try:
            data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
    try:
        return parse_price_sheet(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def default_price_rows() -> list[PriceRow]:
    """The Fireworks price sheet shipped with meter (date and source inside the file)."""
    import tomllib
    from importlib.resources import files

    data = tomllib.loads(files("meter.billing").joinpath("data/fireworks_prices.toml").read_text())
    return parse_price_sheet(data)
