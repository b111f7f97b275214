"""The exchange's state machine (meter.forward.exchange): every request ends once, is published once,
and its outcome follows from how it ended."""

from __future__ import annotations

import itertools

import pytest

from meter.errors import UpstreamUnreachable
from meter.forward.exchange import ENDS, Exchange, IllegalTransition, Phase, advance, build_record, outcome
from meter.records import Outcome

LIFE = [Phase.RECEIVED, Phase.ADMITTED, Phase.FORWARDING, Phase.RELAYING]


def exchange(status: int = 200) -> Exchange:
    x = Exchange({"method": "POST", "path": "/v1/chat/completions", "headers": []}, t0=1.0, start_ns=0)
    x.status = status
    return x


@pytest.mark.parametrize(("stage", "end"), itertools.product(range(len(LIFE)), [Phase.ABORTED, Phase.FAILED]))
def test_every_live_phase_can_end_aborted_or_failed_then_be_published(stage, end):
    phase = Phase.RECEIVED
    for nxt in LIFE[1 : stage + 1]:
        phase = advance(phase, nxt)
    phase = advance(phase, end)
    assert advance(phase, Phase.PUBLISHED) is Phase.PUBLISHED


def test_only_a_relayed_response_completes():
    for phase in LIFE[:-1]:
        with pytest.raises(IllegalTransition):
            advance(phase, Phase.COMPLETE)
    assert advance(Phase.RELAYING, Phase.COMPLETE) is Phase.COMPLETE


@pytest.mark.parametrize(("end", "other"), itertools.product(sorted(ENDS, key=str), sorted(ENDS, key=str)))
def test_an_end_is_never_followed_by_another(end, other):
    with pytest.raises(IllegalTransition):
        advance(end, other)


def test_nothing_follows_publishing_and_nothing_unended_is_published():
    for phase in Phase:
        with pytest.raises(IllegalTransition):
            advance(Phase.PUBLISHED, phase)
    for phase in LIFE:
        with pytest.raises(IllegalTransition):
            advance(phase, Phase.PUBLISHED)


def test_phases_are_not_skipped():
    with pytest.raises(IllegalTransition):
        advance(Phase.RECEIVED, Phase.FORWARDING)
    with pytest.raises(IllegalTransition):
        advance(Phase.ADMITTED, Phase.RELAYING)


def test_the_outcome_follows_from_the_end():
    assert outcome(Phase.COMPLETE, exchange(200)) is Outcome.OK
    assert outcome(Phase.COMPLETE, exchange(429)) is Outcome.UPSTREAM_ERROR
    assert outcome(Phase.ABORTED, exchange(200)) is Outcome.ABORTED
    assert outcome(Phase.FAILED, exchange(502)) is Outcome.PROXY_ERROR


def test_the_record_says_what_meter_answered():
    x = exchange(502)
    x.error = UpstreamUnreachable("cannot reach upstream: refused")
    record = build_record(x, Phase.FAILED, t_end=1.25, price=None)
    assert (record.outcome, record.status_code, record.error) == (
        Outcome.PROXY_ERROR,
        502,
        "cannot reach upstream: refused",
    )
    assert record.duration_ms == 250.0
