"""Garbage-collector settings for a long-running server process (``meter serve``, ``meter simulate``).

Everything alive once the server has started (modules, the app, its pools) lives until exit: freeze it
out of the collector's scans, and collect less often. With the interpreter's defaults a full collection
scans every object of the process and pauses the event loop: ~70 ms in ``meter serve`` under load, and
~25 ms in the simulator, once every ~5,000 streamed requests (a time-to-first-token outlier that the
benchmark then charged to whichever target it was measuring).
"""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 50, 100)  # allocations before a young collection; young (then middle) ones per older


def settle_collector(thresholds: tuple[int, int, int] | None = THRESHOLDS) -> None:
    """Collect once, freeze what survives, and set ``thresholds`` (None: keep the interpreter's).
    Call it once start-up is done.

    Raised thresholds suit a process that makes little cyclic garbage per request (``meter serve``).
    One that makes much (the simulator: ~20 objects in cycles per stream) must keep the default: a
    young generation of 50,000 objects, most of them garbage, takes ~20 ms to collect."""
    gc.collect()
    gc.freeze()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
