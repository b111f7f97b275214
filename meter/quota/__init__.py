"""Quota enforcement: budgets and rate limits that hold exactly across replicas.

Data flow: the pure arithmetic (:mod:`~meter.quota.policy` limits, :mod:`~meter.quota.periods`,
:mod:`~meter.quota.spend` estimates and spend, :mod:`~meter.quota.decision` ``decide``) →
:mod:`~meter.quota.store` (the port) with :mod:`~meter.quota.memory` and
:mod:`~meter.quota.redis_store` (atomic Lua scripts in :mod:`~meter.quota.scripts`) →
:mod:`~meter.quota.admission` (the forward path's API, metrics, failure policy) →
:mod:`~meter.quota.responses` (429/503 bodies and OpenAI rate-limit headers).

The Redis store is imported from :mod:`meter.quota.redis_store` directly, so ``redis`` is needed only
when it is used.
"""

from meter.quota.admission import UNLIMITED, Admission, AdmissionConfig, AdmissionResult, PolicyLookup
from meter.quota.decision import Breach, LimitKind, decide
from meter.quota.memory import MemoryStore
from meter.quota.periods import period_window
from meter.quota.policy import Limits, Policy, Subject
from meter.quota.responses import Rejection, ratelimit_headers
from meter.quota.spend import Estimate, Price, PriceFn, Spend, estimate
from meter.quota.store import QuotaStore, Refusal, Reservation, Settlement, SubjectState

__all__ = [
    "UNLIMITED",
    "Admission",
    "AdmissionConfig",
    "AdmissionResult",
    "Breach",
    "Estimate",
    "LimitKind",
    "Limits",
    "MemoryStore",
    "Policy",
    "PolicyLookup",
    "Price",
    "PriceFn",
    "QuotaStore",
    "Refusal",
    "Rejection",
    "Reservation",
    "Settlement",
    "Spend",
    "Subject",
    "SubjectState",
    "decide",
    "estimate",
    "period_window",
    "ratelimit_headers",
]
