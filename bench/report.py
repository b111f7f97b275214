"""The benchmark's plain-text report: per-target tables, what meter adds over direct (and over the
pass-through with ``--baseline``), the targets, and the server/client verdicts (computed by
:mod:`bench.compare`). Pure: the results document in, text out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from bench.compare import get as _get
from bench.compare import steps as _steps

SECTIONS = (
    "LATENCY",
    "STREAMING",
    "THROUGHPUT",
    "MEMORY",
    "ADDED BY METER",
    "TARGETS",
)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _added_rows(entry: dict[str, Any]) -> list[list[str]]:
    """Rows ``target, what, added p50, added p99`` of one comparison's latency and TTFT differences."""
    rows = []
    for key, what in (("latency", "latency @ {}/s"), ("ttft", "TTFT @ {} streams/s")):
        for rate, added in entry[key].items():
            rows.append(
                [
                    entry["target"],
                    what.format(rate),
                    _signed(added["added_p50_ms"]),
                    _signed(added["added_p99_ms"]),
                ]
            )
    return rows


def _signed(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  " + "  ".join([first, *rest]).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _reruns(results: dict[str, Any]) -> int:
    return sum(step.get("noisy_rounds_rerun", 0) for t in results["targets"] for _, step in _steps(t))


def _errors(step: dict[str, Any] | None) -> str:
    if not step:
        return "-"
    if step.get("failed"):
        return "FAILED"
    errors = step.get("errors") or {}
    return "0" if not errors else ",".join(f"{k}={v}" for k, v in sorted(errors.items()))


def _mb(step: dict[str, Any] | None) -> str:
    value = _get(step, "rss_mb")
    return "-" if value is None else f"{value:.0f}"


def _spread(step: dict[str, Any] | None) -> str:
    values = _get(step, "rps_by_round") or []
    return "-" if len(values) < 2 else f"{min(values):.0f}-{max(values):.0f}"


def _cpu(step: dict[str, Any] | None, who: str) -> str:
    value = _get(step, "cpu_pct", who)
    return "-" if value is None else f"{value:.0f}%"


def _other(step: dict[str, Any] | None) -> str:
    """'other cpu', with the part of it that was hypervisor steal in parentheses when there was any."""
    other, steal = _get(step, "cpu_pct", "other"), _get(step, "cpu_pct", "steal")
    if other is None:
        return "-"
    return f"{other:.0f}% ({steal:.0f})" if steal else f"{other:.0f}%"


def _baseline(versus: Sequence[dict[str, Any]]) -> list[str]:
    out = [
        "",
        "METER VS PASS-THROUGH  the same server and client with nothing observed or recorded, on the same "
        "pinned core",
    ]
    rows = []
    for v in versus:
        for what, label in (("requests", "max req/s"), ("streams", "max streams/s")):
            rows.append(
                [
                    v["target"],
                    label,
                    _fmt(v["max_rps"][what]["meter"], 0),
                    _fmt(v["max_rps"][what]["passthrough"], 0),
                    _fmt(v["throughput_ratio"][what], 3),
                    _fmt(v["own_us_per_request"][what], 0),
                    _fmt((v.get("own_cpu_us_per_request") or {}).get(what), 0),
                ]
            )
    out += _table(
        ["target", "what", "meter", "pass-through", "ratio", "meter's own µs/request", "by CPU time"], rows
    )
    out.append(
        "  meter's own µs/request = 1e6/meter max - 1e6/pass-through max: CPU time per request (or per"
    )
    out.append("  stream) that meter's own work adds, both maxima measured on the same saturated core;")
    out.append(
        "  by CPU time = meter's CPU seconds per answered request minus the pass-through's, over the same"
    )
    out.append(
        "  steps: the same cost counted from the processes' CPU time, which hypervisor steal and a core"
    )
    out.append("  the load did not saturate leave alone")
    rows = [row for v in versus for row in _added_rows(v)]
    out += ["", *_table(["target", "meter minus pass-through", "added p50", "added p99"], rows)]
    return out


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    targets = results["targets"]
    out: list[str] = []
    out.append("meter benchmark")
    out.append(f"  run:        {meta['started_at']}  ({meta['elapsed_s']:.0f} s)  {meta['command']}")
    out.append(
        f"  meter:      source {meta.get('source', 'unknown')}; versions "
        + ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
    )
    out.append(f"  machine:    {meta['cpus']} CPUs; pinning: {meta['pinning']}")
    out.append(f"  simulator:  {meta['simulator']}")
    out.append(
        f"  per step:   {meta['duration_s']:g} s measured per target, in {meta['rounds']} rounds alternating "
        f"between targets; each open-loop round starts with {meta['warmup_s']:g} s not measured"
    )
    out.append(f"  open loop:  {meta['open_generator']}; latency from each request's scheduled start")
    out.append(f"  closed loop: {meta['closed_generator']}")
    if meta.get("baseline"):
        out.append(f"  pass-through: {meta['baseline']}; its cpu and MB are in the meter columns")
    if meta.get("meter_env"):
        out.append("  meter env:  " + " ".join(f"{k}={v}" for k, v in meta["meter_env"].items()))
    if meta.get("variant"):
        variant = " ".join(f"{k}={v}" for k, v in meta["variant"].items())
        out.append(f"  variant:    a second meter, with {variant} (the target named after it)")
    if meta.get("compare_source"):
        ref = meta["compare_source"]
        out.append(f"  compare:    a second meter running the source of git {ref} (the target named @{ref})")
    if meta.get("quota_variant"):
        variant = " ".join(f"{k}={v}" for k, v in meta["quota_variant"].items())
        out.append(f"  variant:    a second meter with limits, with {variant} (the target named after it)")
    if meta.get("quota_redis"):
        out.append(f"  quota:      counters in {meta['quota_redis']}")
    out.append(
        "  percentiles are nearest-rank; ms = milliseconds; 'lag' = how late the generator sent (its health)"
    )
    out.append(
        "  cpu columns: share of one core over the step; 'other' = processes outside the bench "
        f"(rounds re-run because of them: {_reruns(results)}), in parentheses the part of it that was "
        "hypervisor steal (a virtual machine's CPU given to other guests while it had work)"
    )
    for warning in results.get("warnings") or []:
        out.append(f"  ! {warning}")

    out.append("")
    out.append("LATENCY  non-streaming, open loop (ms from scheduled start)")
    rows = []
    for rate in meta["rates"]:
        for t in targets:
            s = _get(t, "latency", str(rate))
            rows.append(
                [
                    t["name"],
                    str(rate),
                    _fmt(_get(s, "achieved_rps"), 1),
                    _fmt(_get(s, "latency_ms", "p50")),
                    _fmt(_get(s, "latency_ms", "p90")),
                    _fmt(_get(s, "latency_ms", "p99")),
                    _fmt(_get(s, "latency_ms", "max")),
                    _fmt(_get(s, "lag_ms", "p99")),
                    _errors(s),
                    _cpu(s, "meter"),
                    _cpu(s, "simulator"),
                    _other(s),
                    _mb(s),
                ]
            )
    out += _table(
        [
            "target",
            "rate/s",
            "achieved/s",
            "p50",
            "p90",
            "p99",
            "max",
            "lag p99",
            "errors",
            "meter cpu",
            "sim cpu",
            "other cpu",
            "meter MB",
        ],
        rows,
    )

    out.append("")
    out.append(
        f"STREAMING  open loop, {meta['stream_chunks']} content chunks per stream "
        "(TTFT = scheduled start to first content chunk; ms)"
    )
    rows = []
    for rate in meta["stream_rates"]:
        for t in targets:
            s = _get(t, "stream", str(rate))
            rows.append(
                [
                    t["name"],
                    str(rate),
                    _fmt(_get(s, "achieved_rps"), 1),
                    _fmt(_get(s, "ttft_ms", "p50")),
                    _fmt(_get(s, "ttft_ms", "p99")),
                    _fmt(_get(s, "latency_ms", "p50")),
                    _fmt(_get(s, "latency_ms", "p99")),
                    _fmt(_get(s, "lag_ms", "p99")),
                    _errors(s),
                    _cpu(s, "meter"),
                    _cpu(s, "simulator"),
                    _other(s),
                    _mb(s),
                ]
            )
    out += _table(
        [
            "target",
            "rate/s",
            "achieved/s",
            "TTFT p50",
            "TTFT p99",
            "whole p50",
            "whole p99",
            "lag p99",
            "errors",
            "meter cpu",
            "sim cpu",
            "other cpu",
            "meter MB",
        ],
        rows,
    )

    out.append("")
    out.append("THROUGHPUT  maximum, closed loop (fixed concurrent connections for the whole step)")
    rows = []
    for t in targets:
        for key, label in (("max_requests", "req/s"), ("max_streams", "streams/s")):
            s = t.get(key)
            rows.append(
                [
                    t["name"],
                    label,
                    _fmt(_get(s, "achieved_rps"), 0),
                    _spread(s),
                    _fmt(_get(s, "latency_ms", "p50")),
                    _fmt(_get(s, "latency_ms", "p99")),
                    str(_get(s, "generator") or "-"),
                    str(_get(s, "connections") or "-"),
                    _errors(s),
                    _cpu(s, "meter"),
                    _cpu(s, "simulator"),
                    _other(s),
                    _mb(s),
                ]
            )
    out += _table(
        [
            "target",
            "what",
            "max",
            "rounds",
            "p50 ms",
            "p99 ms",
            "generator",
            "conns",
            "errors",
            "meter cpu",
            "sim cpu",
            "other cpu",
            "meter MB",
        ],
        rows,
    )
    out.append(
        "  max = median of the rounds; rounds = lowest-highest round. p50/p99 = median of the rounds'."
    )
    out.append("  meter cpu counts all of meter's processes and threads; 100% = its one core saturated;")
    out.append(
        "  meter MB = peak RSS of meter's serving process(es) during the step (VmHWM reset at each round)"
    )

    out.append("")
    out.append("MEMORY  meter's resident set (MB = 10^6 bytes); records written to SQLite")
    rows = []
    for t in targets:
        if t["kind"] not in ("meter", "passthrough"):
            continue
        rss = t.get("rss") or {}
        rows.append(
            [
                t["name"],
                _fmt(rss.get("idle_mb"), 1),
                _fmt(rss.get("serving_mb"), 1),
                str(rss.get("peak_step", "-")),
                _fmt(rss.get("closed_loop_mb"), 1),
                _fmt(rss.get("total_mb"), 1),
                str(rss.get("processes", "-")),
                str(t.get("records_written", "-")),
                str(t.get("requests_seen", "-")),
            ]
        )
    out += _table(
        [
            "target",
            "idle",
            "peak",
            "peak during",
            "at max load",
            "with supervisor",
            "processes",
            "records",
            "requests seen",
        ],
        rows,
    )
    out.append("  idle = VmRSS after warm-up; peak = VmHWM of the serving process over the steps.")
    out.append("  records = rows in meter's SQLite file after shutdown;")
    out.append("  requests seen = requests the simulator received while that target was being measured.")

    out.append("")
    out.append("ADDED BY METER  meter minus direct, same offered load (ms; throughput as meter/direct)")
    rows = [row for c in results["comparison"] for row in _added_rows(c)]
    out += _table(["target", "what", "added p50", "added p99"], rows)
    rows = [
        [c["target"], _fmt(c["throughput_ratio"]["requests"], 3), _fmt(c["throughput_ratio"]["streams"], 3)]
        for c in results["comparison"]
    ]
    out += ["", *_table(["target", "req/s ratio", "streams/s ratio"], rows)]

    if results.get("baseline"):
        out += _baseline(results["baseline"])

    if results.get("quota"):
        out.append("")
        out.append(
            "QUOTA ADMISSION  meter with limits on (Redis; team + key, every kind of limit) minus the same "
            "meter without limits (ms; throughput as on/off)"
        )
        rows = []
        for q in results["quota"]:
            rows += _added_rows(q)
            rows.append(
                [
                    q["target"],
                    "throughput on/off",
                    f"req {_fmt(q['throughput_ratio']['requests'], 3)}",
                    f"streams {_fmt(q['throughput_ratio']['streams'], 3)}",
                ]
            )
        out += _table(["target", "what", "added p50", "added p99"], rows)
    out.append("")
    out.append("TARGETS  per meter process, everything on (usage parsing, SQLite record, metrics)")
    rows = []
    for c in results["comparison"]:
        for check in c["checks"]:
            verdict = {True: "PASS", False: "MISS", None: "n/a"}[check["ok"]]
            rows.append(
                [c["target"], check["name"], _fmt(check["value"]), check["target"], verdict, check["note"]]
            )
    out += _table(["target", "check", "value", "target", "verdict", "note"], rows)

    for key, title in (("servers", "SERVERS  ASGI server"), ("clients", "CLIENTS  forward client")):
        if not results.get(key):
            continue
        out.append("")
        out.append(f"{title}  (winner: higher geometric mean of max req/s and max streams/s)")
        for verdict in results[key]:
            axis = verdict["axis"]
            fixed = "client" if axis == "server" else "server"
            rows = []
            for cand in verdict["candidates"]:
                rows.append(
                    [
                        cand[axis],
                        _fmt(cand["max_rps"], 0),
                        _fmt(cand["max_streams_per_s"], 0),
                        " ".join(f"{r}:{_fmt(v)}" for r, v in cand["p50_ms"].items()),
                        " ".join(f"{r}:{_fmt(v)}" for r, v in cand["p99_ms"].items()),
                        " ".join(f"{r}:{_fmt(v)}" for r, v in cand["ttft_p99_ms"].items()),
                        _fmt(cand["rss_mb"], 1),
                    ]
                )
            out += _table(
                [axis, "req/s", "streams/s", "p50 ms by rate", "p99 ms by rate", "TTFT p99", "RSS MB"], rows
            )
            out.append(
                f"  -> {verdict['winner']} wins ({fixed} {verdict[fixed]}): "
                f"{_signed(verdict['margin_pct'], 1)}% over {verdict['runner_up']} on throughput"
            )
    return "\n".join(out) + "\n"
