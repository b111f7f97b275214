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
