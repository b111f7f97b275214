"""The Redis store's Lua scripts: every change to quota state is one of these, run atomically by Redis.

They implement :mod:`meter.quota.store`'s rules with :mod:`meter.quota.decision`'s arithmetic (Rule 2,
the refusal rule; Rule 3, which breach is reported); ``tests/quota/test_store.py`` holds them and the
in-memory store to the same cases.

Keys, for subject ``S`` under prefix ``P`` (``base`` = ``P .. S``):

* ``base:b:<period start ms>`` hash: ``spent``, ``tok``, ``ptok``, ``ctok`` (settled), ``r_usd``,
  ``r_ptok``, ``r_ctok`` (held by reservations in flight), ``soft<k>`` (soft threshold reported);
  micro-USD and tokens as integers. Expires two days after the period ends.
* ``base:l`` sorted set, the ledger: one member ``id|period start ms|usd|prompt|completion`` per
  reservation in flight, scored by its lease deadline (ms). Outlives the budget hash by a lease.
* ``base:x`` sorted set: tombstones of lease-expired reservations (same members), scored by when they
  are dropped, so a late settle can still count its spend exactly once.
* ``base:w`` sorted set, the rate window: one member ``id|tokens`` per admission, scored by its time
  (ms); ``base:ws`` the window's token sum. Both expire 61 s after the last admission.

Numbers cross into Lua as decimal strings and are exact up to 2^53 (9e9 USD in micro-USD). A
subject's limits travel as one comma-separated argument and replies come back as one comma-separated
string: on the request path, encoding and parsing dozens of separate values costs more than the
script. ``now`` is the caller's clock in ms, or Redis's own (``TIME``) when the caller passes -1.

The scripts derive a subject's keys from its ``base`` (passed as an argument, so a call carries a
dozen values rather than thirty): that, and a request's team and key keys living in different
slots, makes them unfit for Redis Cluster. A single Redis (with replicas/Sentinel for failover) is
the deployment this store is for.
"""

from __future__ import annotations

COMMON = r"""
local WINDOW = 60000
local TOMB = 86400000

-- integers as decimal text: '%d' formats a C long (exact for the integers these scripts handle, all
-- below 2^53), without the multi-precision arithmetic glibc's '%.0f' does for a double
local function fmt(n)
  return string.format('%d', n)
end

local function num(v)
  if v then return tonumber(v) end
  return 0
end

local function csv(s)
  local t = {}
  for v in string.gmatch(s, '[^,]+') do t[#t + 1] = tonumber(v) end
  return t
end

local function reply(out)
  for i = 1, #out do out[i] = fmt(out[i]) end
  return table.concat(out, ',')
end

local function clock(arg)
  local now = tonumber(arg)
  if now < 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end

-- a subject's keys: budget of the period starting at ps, ledger, tombstones, window, window sum
local function keys_of(base, ps)
  return base .. ':b:' .. ps, base .. ':l', base .. ':x', base .. ':w', base .. ':ws'
end

local function admits(used, req, limit)
  return used < limit and used + req <= limit
end

local function parse_member(m)
  local ps, usd, p, c = string.match(m, '^[^|]*|(%d+)|(%d+)|(%d+)|(%d+)$')
  return ps, tonumber(usd), tonumber(p), tonumber(c)
end

-- Leases past their deadline release what they held and become tombstones (store Rule 3).
local function prune_ledger(L, X, base, now)
  local expired = redis.call('ZRANGEBYSCORE', L, '-inf', now)
  if #expired == 0 then return end
  for _, m in ipairs(expired) do
    local ps, usd, p, c = parse_member(m)
    local bk = base .. ':b:' .. ps
    if redis.call('EXISTS', bk) == 1 then
      redis.call('HINCRBY', bk, 'r_usd', fmt(-usd))
      redis.call('HINCRBY', bk, 'r_ptok', fmt(-p))
      redis.call('HINCRBY', bk, 'r_ctok', fmt(-c))
    end
    redis.call('ZADD', X, fmt(now + TOMB), m)
  end
  redis.call('ZREMRANGEBYSCORE', L, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', X, '-inf', now)
  redis.call('PEXPIRE', X, TOMB)
end

-- Drops admissions older than the window; returns their count and token sum.
local function prune_window(W, WS, now)
  local cutoff = now - WINDOW
  local old = redis.call('ZRANGEBYSCORE', W, '-inf', cutoff)
  if #old > 0 then
    local freed = 0
    for _, m in ipairs(old) do freed = freed + tonumber(string.match(m, '|(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', W, '-inf', cutoff)
    if freed ~= 0 then redis.call('DECRBY', WS, fmt(freed)) end
  end
  local count = redis.call('ZCARD', W)
  if count == 0 then
    if #old > 0 then redis.call('DEL', WS) end
    return 0, 0
  end
  return count, num(redis.call('GET', WS))
end

-- ms until the window is empty again
local function window_reset(W, now)
  local newest = redis.call('ZRANGE', W, -1, -1, 'WITHSCORES')
  if #newest == 0 then return 0 end
  return math.max(tonumber(newest[2]) + WINDOW - now, 0)
end

-- State layout (11 numbers): spent, r_usd, tok, ptok, ctok, r_ptok, r_ctok, wcount, wsum, inflight,
-- wreset (filled in by the caller when it needs it). The window is read only if `windowed`, the
-- ledger counted only if `counted` (each redis.call costs; admission reads what it checks). The
-- second value is true when the budget hash has no reservation field yet (it needs its TTL).
local function read_state(B, L, W, WS, windowed, counted, now)
  local v = redis.call('HMGET', B, 'spent', 'r_usd', 'tok', 'ptok', 'ctok', 'r_ptok', 'r_ctok')
  local wcount, wsum, inflight = 0, 0, 0
  if windowed then wcount, wsum = prune_window(W, WS, now) end
  if counted then inflight = redis.call('ZCARD', L) end
  return {num(v[1]), num(v[2]), num(v[3]), num(v[4]), num(v[5]), num(v[6]), num(v[7]),
          wcount, wsum, inflight, 0}, not v[2]
end

-- use per limit kind, in policy.LimitKind order
local function used_of(st)
  return {st[1] + st[2], st[3] + st[6] + st[7], st[4] + st[6], st[5] + st[7], st[8], st[9], st[10]}
end

-- soft thresholds of the 4 budget kinds in lim[from .. from+3] (-1: none); bitmask of newly reached
local function soft_bits(B, st, lim, from)
  local used = nil
  local bits = 0
  for k = 1, 4 do
    local threshold = lim[from + k - 1]
    if threshold >= 0 then
      used = used or used_of(st)
      if used[k] >= threshold and redis.call('HSETNX', B, 'soft' .. k, '1') == 1 then
        bits = bits + 2 ^ (k - 1)
      end
    end
  end
  return bits
end
"""

# ARGV: now, id, est_usd, est_prompt, est_completion, lease_ms, n, then 2 per subject: base, and
#   13 comma-separated numbers: period start (ms), budget ttl (ms), the 7 limits in policy.LimitKind
#   order, the 4 budget soft thresholds (-1 = none).
# Returns "ok,now,subject,kind,limit,used,requested,retry_ms" and then 12 numbers per subject: the 11
# state numbers and the soft bitmask.
RESERVE = (
    COMMON
    + r"""
local now = clock(ARGV[1])
local rid = ARGV[2]
local eu, ep, ec = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local lease = tonumber(ARGV[6])
local n = tonumber(ARGV[7])
local et = ep + ec
local req = {eu, et, ep, ec, 1, et, 1}
local tail = '|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5]

local subjects = {}
for i = 1, n do
  local base, nums = ARGV[6 + 2 * i], csv(ARGV[7 + 2 * i])
  local ps = fmt(nums[1])
  local B, L, X, W, WS = keys_of(base, ps)
  subjects[i] = {base = base, B = B, L = L, X = X, W = W, WS = WS, bttl = nums[2], lim = nums,
                 windowed = nums[7] >= 0 or nums[8] >= 0, counted = nums[9] >= 0,
                 member = rid .. '|' .. ps .. tail}
end

local states = {}
local best_kind, best_i, best_limit, best_used = 99, 0, 0, 0
local replay = n > 0 and redis.call('ZSCORE', subjects[1].L, subjects[1].member)
for i = 1, n do
  local s = subjects[i]
  prune_ledger(s.L, s.X, s.base, now)
  local st, fresh = read_state(s.B, s.L, s.W, s.WS, s.windowed, s.counted, now)
  states[i] = st
  s.fresh = fresh
  if not replay then
    local used = used_of(st)
    for k = 1, math.min(7, best_kind - 1) do
      local limit = s.lim[k + 2]
      if limit >= 0 and not admits(used[k], req[k], limit) then
        best_kind, best_i, best_limit, best_used = k, i, limit, used[k]
        break
      end
    end
  end
end

local out
if best_i > 0 then
  local retry = -1
  local W = subjects[best_i].W
  if best_kind == 5 and best_limit > 0 then
    local index = states[best_i][8] - best_limit
    retry = 1
    if index >= 0 then
      local e = redis.call('ZRANGE', W, index, index, 'WITHSCORES')
      retry = math.max(tonumber(e[2]) + WINDOW - now, 1)
    end
  elseif best_kind == 6 and et <= best_limit and best_limit > 0 then
    local used = states[best_i][9]
    local start = 0
    retry = 1
    local found = false
    while not found do
      local chunk = redis.call('ZRANGE', W, start, start + 99, 'WITHSCORES')
      if #chunk == 0 then break end
      for j = 1, #chunk, 2 do
        used = used - tonumber(string.match(chunk[j], '|(%d+)$'))
        if admits(used, et, best_limit) then
          retry = math.max(tonumber(chunk[j + 1]) + WINDOW - now, 1)
          found = true
          break
        end
      end
      start = start + 100
    end
  end
  out = {0, now, best_i, best_kind, best_limit, best_used, req[best_kind], retry}
  for i = 1, n do
    local st = states[i]
    if st[8] > 0 then st[11] = window_reset(subjects[i].W, now) end
    for _, v in ipairs(st) do out[#out + 1] = v end
    out[#out + 1] = 0
  end
  return reply(out)
end

out = {1, now, 0, 0, 0, 0, 0, 0}
for i = 1, n do
  local s, st = subjects[i], states[i]
  local bits = 0
  if not replay then
    st[2], st[6], st[7], st[10] = st[2] + eu, st[6] + ep, st[7] + ec, st[10] + 1
    redis.call('HSET', s.B, 'r_usd', fmt(st[2]), 'r_ptok', fmt(st[6]), 'r_ctok', fmt(st[7]))
    if s.fresh then redis.call('PEXPIRE', s.B, fmt(s.bttl)) end  -- expires at period end + grace
    redis.call('ZADD', s.L, fmt(now + lease), s.member)
    redis.call('PEXPIRE', s.L, fmt(s.bttl + lease))
    if s.windowed then
      st[8], st[9], st[11] = st[8] + 1, st[9] + et, WINDOW
      redis.call('ZADD', s.W, fmt(now), rid .. '|' .. fmt(et))
      redis.call('PEXPIRE', s.W, WINDOW + 1000)
      redis.call('SET', s.WS, fmt(st[9]), 'PX', WINDOW + 1000)
    end
    bits = soft_bits(s.B, st, s.lim, 10)
  elseif st[8] > 0 then
    st[11] = window_reset(s.W, now)
  end
  for _, v in ipairs(st) do out[#out + 1] = v end
  out[#out + 1] = bits
end
return reply(out)
"""
)

# ARGV: now, id, usd, prompt, completion, total, n, then 3 per subject: base, the ledger member,
#   and 8 comma-separated numbers: has tpm (0/1), reserved total tokens, budget ttl (ms), the 4
#   budget soft thresholds (-1 = none), has max_concurrent (0/1). The budget hash is the one of the
#   member's period. (An rpm-only window needs no change: the request stays counted.)
# Returns "now" and then 14 numbers per subject: applied, late, the 11 state numbers (window count
# and sum are not read: 0), the soft bitmask.
SETTLE = (
    COMMON
    + r"""
local now = clock(ARGV[1])
local rid = ARGV[2]
local au, ap, ac, at = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local n = tonumber(ARGV[7])
local out = {now}
for i = 1, n do
  local base, m, nums = ARGV[5 + 3 * i], ARGV[6 + 3 * i], csv(ARGV[7 + 3 * i])
  local ps, usd, p, c = parse_member(m)
  local B, L, X, W, WS = keys_of(base, ps)
  prune_ledger(L, X, base, now)
  local applied, late = 0, 0
  if redis.call('ZREM', L, m) == 1 then
    applied = 1
  elseif redis.call('ZREM', X, m) == 1 then
    applied, late = 1, 1
    usd, p, c = 0, 0, 0  -- released when the lease expired
  end
  local st, fresh = read_state(B, L, W, WS, false, nums[8] == 1, now)
  local bits = 0
  if applied == 1 then
    st[1], st[3], st[4], st[5] = st[1] + au, st[3] + at, st[4] + ap, st[5] + ac
    -- (clamped: the counters may have expired under a very late settle)
    st[2], st[6], st[7] = math.max(st[2] - usd, 0), math.max(st[6] - p, 0), math.max(st[7] - c, 0)
    redis.call('HSET', B, 'spent', fmt(st[1]), 'tok', fmt(st[3]), 'ptok', fmt(st[4]), 'ctok', fmt(st[5]),
      'r_usd', fmt(st[2]), 'r_ptok', fmt(st[6]), 'r_ctok', fmt(st[7]))
    if fresh then redis.call('PEXPIRE', B, fmt(nums[3])) end
    if nums[1] == 1 then
      local old = rid .. '|' .. fmt(nums[2])
      local score = redis.call('ZSCORE', W, old)
      if score then
        redis.call('ZREM', W, old)
        redis.call('ZADD', W, score, rid .. '|' .. fmt(at))
        local delta = at - nums[2]
        if delta ~= 0 then redis.call('INCRBY', WS, fmt(delta)) end
      end
    end
    bits = soft_bits(B, st, nums, 4)
  end
  out[#out + 1] = applied
  out[#out + 1] = late
  for _, v in ipairs(st) do out[#out + 1] = v end
  out[#out + 1] = bits
end
return reply(out)
"""
)

# ARGV: now, n, then 3 per subject: base, period start (ms), windowed (0/1).
# Returns "now" and 11 state numbers per subject.
STATUS = (
    COMMON
    + r"""
local now = clock(ARGV[1])
local n = tonumber(ARGV[2])
local out = {now}
for i = 1, n do
  local base = ARGV[3 * i]
  local B, L, X, W, WS = keys_of(base, ARGV[3 * i + 1])
  prune_ledger(L, X, base, now)
  local st = read_state(B, L, W, WS, ARGV[3 * i + 2] == '1', true, now)
  if st[8] > 0 then st[11] = window_reset(W, now) end
  for _, v in ipairs(st) do out[#out + 1] = v end
end
return reply(out)
"""
)

# KEYS: B. ARGV: usd, total, prompt, completion, ttl_ms. Sets the settled totals unless they exist.
SEED = r"""
if redis.call('HEXISTS', KEYS[1], 'spent') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'spent', ARGV[1], 'tok', ARGV[2], 'ptok', ARGV[3], 'ctok', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""
