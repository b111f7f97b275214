"""Teams, keys and prices: who a request belongs to, what credential goes upstream, what it costs.

Modules, in data-flow order:

* :mod:`~meter.tenancy.keys` (pure): key kinds, the unknown-key policy, and the resolution of a
  presented key; :mod:`~meter.tenancy.credentials`: upstream credentials by name (no secret in the DB);
* :mod:`~meter.tenancy.directory`: the in-memory key directory the proxy asks per request;
* :mod:`~meter.tenancy.store`: team and key writes with their audit trail (admin API and CLI), composed
  of :mod:`~meter.tenancy.team_store` and :mod:`~meter.tenancy.key_store` on
  :mod:`~meter.tenancy.store_base`, with quota limits as stored (:mod:`~meter.tenancy.limits`) and the
  audit log and tenancy version (:mod:`~meter.tenancy.audit`);
* :mod:`~meter.billing.catalog`: operator price rows and the price book (with :mod:`meter.billing.rating`);
* :mod:`~meter.billing.ledger`: billing reports and re-rating over stored usage;
* :mod:`~meter.tenancy.runtime`: :class:`Tenancy`, the composition a running meter holds, and its
  refresh loop.
* the errors above live in :mod:`meter.errors` with the rest of the hierarchy.
"""
