"""Lua scripts of the Redis Streams queue: every multi-key change of a tenant's queue is one
atomic script. Times come from the Redis clock (``TIME``), never from the callers' clocks.

Key layout (``keys.TenantKeys`` then ``keys.Keys``) of the scripts of one tenant:
    KEYS[1] stream    XADD'd messages: fields run, p (priority), d (deliveries before this entry),
                      tp (the W3C traceparent of the run's origin; absent when not traced)
    KEYS[2] delayed   ZSET member "uid|run|p|d", or "uid|run|p|d|tp" with a trace; score = due
                      time (ms)
    KEYS[3] live      HASH run -> live messages of that run (a parked dead letter counts)
    KEYS[4] dead      dead-letter stream (capped): fields run, p, deliveries, at, tp, reason,
                      parked ('1': it holds its run's live count until replayed)
    KEYS[5] seq       INCR counter for delayed members
    KEYS[6] ready     ZSET, across tenants: tenant -> its pass (weighted round robin); a tenant
                      is in it while its stream has messages not yet delivered
    KEYS[7] due       ZSET, across tenants: tenant -> when (ms) it needs a look: its first
                      delayed message is due, or a lease of its may have lapsed
A message made ready enters its tenant into ``ready`` in the same script; ``DISPATCH`` removes
the tenant once its stream has nothing left to deliver. A delivery's receipt is (consumer, Redis
delivery count); ack, retry and extend act only when the pending entry still belongs to that
consumer with that count, so a late call from a consumer whose message was reclaimed changes
nothing.

Redis Cluster: ``ready`` and ``due`` are one slot each, and the scripts change them together
with a tenant's keys (``DISPATCH`` reaches the tenant keys by name, from the prefix), so on a
cluster the whole queue must share one hash tag (a prefix such as ``{tf}``), which puts it on
one shard. That is the price of entering and leaving the ready set atomically with the
messages; sharding it (N ready sets, each tenant's keys tagged with its shard) is the way out
when one Redis is not enough.
"""

from __future__ import annotations

COMMON = """
-- The keys and tenant being worked on: a tenant's script's own, or DISPATCH's current tenant.
local K, T = KEYS, nil
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
local function forget(run)
  if redis.call('HINCRBY', K[3], run, -1) <= 0 then redis.call('HDEL', K[3], run) end
end
local function owned(group, id, consumer, count)
  -- pcall: after the stream or its group vanished (Redis emptied), nothing is owned.
  local p = redis.pcall('XPENDING', K[1], group, id, id, 1)
  if type(p) ~= 'table' or p.err then return false end
  return #p == 1 and p[1][2] == consumer and tonumber(p[1][4]) == tonumber(count)
end
-- The fields of an entry that this delivery (consumer, count) still owns; nil if it does not,
-- or if the entry is gone (then its pending entry is acknowledged).
local function owned_entry(group, id, consumer, count)
  if not owned(group, id, consumer, count) then return nil end
  local entry = redis.call('XRANGE', K[1], id, id)
  if #entry == 0 then
    redis.call('XACK', K[1], group, id)
    return nil
  end
  return entry[1][2]
end
-- Moves entry id of the stream to the dead letters. Trimmed one entry at a time rather than
-- with MAXLEN ~, so that a parked letter trimmed away gives up its run's live count.
local function dead_letter(group, id, run, p, deliveries, tp, reason, parked, maxlen)
  if redis.call('XLEN', K[4]) >= tonumber(maxlen) then
    local oldest = redis.call('XRANGE', K[4], '-', '+', 'COUNT', 1)
    if #oldest == 1 then
      if field(oldest[1][2], 'parked') == '1' then forget(field(oldest[1][2], 'run')) end
      redis.call('XDEL', K[4], oldest[1][1])
    end
  end
  redis.call('XADD', K[4], '*', 'run', run, 'p', p, 'deliveries', deliveries,
             'at', now_ms(), 'tp', tp or '', 'reason', reason, 'parked', parked)
  redis.call('XACK', K[1], group, id)
  redis.call('XDEL', K[1], id)
  if parked ~= '1' then forget(run) end
end
-- A tenant entering the ready set goes just ahead of its front (a fraction of a turn, so
-- it wins the tie with a flood at the front): served next, without a credit for the time it
-- had nothing.
local function enter()
  if not redis.call('ZSCORE', K[6], T) then
    local front = redis.call('ZRANGE', K[6], 0, 0, 'WITHSCORES')
    redis.call('ZADD', K[6], (tonumber(front[2]) or 0) - 1 / 1024, T)
  end
end
local function look_at(at)
  redis.call('ZADD', K[7], 'LT', at, T)
end
local function put(run, p, d, delay, tp)
  tp = tp or ''
  if delay > 0 then
    local uid = redis.call('INCR', K[5])
    local due = now_ms() + delay
    local member = uid .. '|' .. run .. '|' .. p .. '|' .. d
    -- Untraced members keep the four parts that workers of earlier versions read.
    if tp ~= '' then member = member .. '|' .. tp end
    redis.call('ZADD', K[2], due, member)
    look_at(due)
    return due
  end
  if tp == '' then
    redis.call('XADD', K[1], '*', 'run', run, 'p', p, 'd', d)
  else
    redis.call('XADD', K[1], '*', 'run', run, 'p', p, 'd', d, 'tp', tp)
  end
  enter()
  return now_ms()
end
"""

# ARGV: tenant, then run, priority, traceparent ('' for none), delay_ms for each message.
# Returns the time (ms) the last message becomes ready.
ENQUEUE = (
    COMMON
    + """
T = ARGV[1]
local at = 0
for i = 2, #ARGV, 4 do
  redis.call('HINCRBY', KEYS[3], ARGV[i], 1)
  at = put(ARGV[i], ARGV[i + 1], 0, tonumber(ARGV[i + 3]), ARGV[i + 2])
end
return at
"""
)

# KEYS: ready, due, caps (HASH tenant -> cap on messages in flight: 0 none, below 0 take
#       nothing), weights (HASH tenant -> share, default 1); each tenant's keys are reached by
#       name: ARGV[1] .. ':{t:<tenant>}:' .. stream|delayed|live|dead|seq (``keys.Keys.tenant``).
# ARGV: prefix, group, consumer, count, min_idle_ms, max_deliveries, default cap, dead_maxlen,
#       look (how many tenants beyond count one call may examine), this call's id, n, then n
#       ids of calls whose replies arrived, m, then m ids of calls whose replies did not, then
#       tenants to skip.
# A call that delivers keeps its deliveries under ARGV[1] .. ':taken:' .. consumer .. ':' ..
# id (``keys.Keys.taken``) for min_idle_ms, dropped once its reply arrived. First it delivers
# again those of calls whose replies were lost (a connection reset after the script ran) that
# are still this consumer's with the same count, so they are served now, not reclaimed a lease
# later. Then gives the tenants due for a look theirs (delayed messages made ready, lapsed
# leases found), then serves the tenants at the front of the ready set, each its share of
# count by its weight and pass (``fairness``; reclaimed messages first), moving each on by
# what it took over its weight; a tenant skipped or at its cap stays ready but moves behind
# the tenants looked at, so a call looks at no more than count + look tenants and none holds
# up the others.
# Returns the Redis time (ms), the time of the next look due (-1: none), then per message:
# tenant, id, run, priority, total deliveries, Redis delivery count, traceparent ('' for none).
DISPATCH = (
    COMMON
    + """
local READY, DUE, CAPS, WEIGHTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local count, min_idle, max_deliveries = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local default_cap, dead_maxlen, look = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local function taken_key(call) return prefix .. ':taken:' .. consumer .. ':' .. call end
local call, arg = ARGV[10], 11
local answered, unanswered = {}, {}
for _, list in ipairs({answered, unanswered}) do
  for i = arg + 1, arg + tonumber(ARGV[arg]) do list[#list + 1] = ARGV[i] end
  arg = arg + tonumber(ARGV[arg]) + 1
end
local skip = {}
for i = arg, #ARGV do skip[ARGV[i]] = true end
local now = now_ms()
local out = {}
local function tenant(t)
  T = t
  local tag = prefix .. ':{t:' .. t .. '}:'
  K = {tag .. 'stream', tag .. 'delayed', tag .. 'live', tag .. 'dead', tag .. 'seq', READY, DUE}
end
local function exhausted(id, run, p, deliveries, tp)
  local times = deliveries == 1 and ' time' or ' times'
  local reason = 'delivered ' .. deliveries .. times .. ' without being acknowledged'
  dead_letter(group, id, run, p, deliveries, tp, reason, '0', dead_maxlen)
end
local function deliver(id, run, p, deliveries, count_, tp)
  for _, v in ipairs({T, id, run, p, deliveries, count_, tp}) do table.insert(out, v) end
end
local function promote()
  local due = redis.call('ZRANGEBYSCORE', K[2], '-inf', now, 'LIMIT', 0, 500)
  for _, member in ipairs(due) do
    -- Four parts, or five with a trace.
    local uid, run, p, d, tp = string.match(member, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|?(.*)$')
    put(run, p, d, 0, tp)
    redis.call('ZREM', K[2], member)
  end
end
local function pending_count()
  local summary = redis.pcall('XPENDING', K[1], group)
  if type(summary) ~= 'table' or summary.err then return 0 end
  return tonumber(summary[1])
end
-- When the tenant next needs a look (its first delayed message, the first of its leases to
-- lapse), in the due set; a look already due is taken at once (it enters the ready set).
local function schedule()
  local at = nil
  local first = redis.call('ZRANGE', K[2], 0, 0, 'WITHSCORES')
  if #first == 2 then at = tonumber(first[2]) end
  local leased = redis.pcall('XPENDING', K[1], group, '-', '+', 100)
  if type(leased) == 'table' and not leased.err then
    for _, pe in ipairs(leased) do
      local lapse = now + min_idle - tonumber(pe[3])
      if at == nil or lapse < at then at = lapse end
    end
  end
  if at == nil then
    redis.call('ZREM', DUE, T)
  elseif at <= now then
    redis.call('ZREM', DUE, T)
    enter()
  else
    redis.call('ZADD', DUE, at, T)
  end
end
-- Up to want messages of the current tenant: reclaimed ones first, then new ones within its
-- cap. Returns how many it took and how many are left undelivered.
local function visit(want, cap)
  promote()
  -- A tenant purged while ready: nothing to read, and no empty stream to leave behind.
  if redis.call('EXISTS', K[1]) == 0 then return 0, 0 end
  redis.pcall('XGROUP', 'CREATE', K[1], group, '0', 'MKSTREAM')
  local taken = 0
  local idle = redis.call('XPENDING', K[1], group, 'IDLE', min_idle, '-', '+', want)
  for _, pe in ipairs(idle) do
    local id, deliveries = pe[1], tonumber(pe[4])
    local entry = redis.call('XRANGE', K[1], id, id)
    if #entry == 0 then
      redis.call('XACK', K[1], group, id)
    else
      local fields = entry[1][2]
      local run, p, d = field(fields, 'run'), field(fields, 'p'), tonumber(field(fields, 'd'))
      local tp = field(fields, 'tp') or ''
      if deliveries + d >= max_deliveries then
        exhausted(id, run, p, deliveries + d, tp)
      elseif #redis.call('XCLAIM', K[1], group, consumer, min_idle, id) == 1 then
        deliver(id, run, p, deliveries + 1 + d, deliveries + 1, tp)
        taken = taken + 1
      end
    end
  end
  local room = want - taken
  if cap ~= 0 then room = math.min(room, cap - pending_count()) end
  if room > 0 then
    local fresh = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', room,
                             'STREAMS', K[1], '>')
    if fresh then
      for _, entry in ipairs(fresh[1][2]) do
        local fields = entry[2]
        local run, p, d = field(fields, 'run'), field(fields, 'p'), tonumber(field(fields, 'd'))
        local tp = field(fields, 'tp') or ''
        if d >= max_deliveries then
          exhausted(entry[1], run, p, d, tp)
        else
          deliver(entry[1], run, p, d + 1, 1, tp)
          taken = taken + 1
        end
      end
    end
  end
  -- Acknowledged and dead-lettered entries are deleted: the rest not pending is undelivered.
  return taken, redis.call('XLEN', K[1]) - pending_count()
end

for _, c in ipairs(answered) do redis.call('DEL', taken_key(c)) end
-- Deliveries of a call whose reply this consumer never got, still its own with the same count:
-- delivered again, with a fresh lease, before anything new.
local recovered = 0
for _, c in ipairs(unanswered) do
  local stored = redis.call('GET', taken_key(c))
  if stored then
    redis.call('DEL', taken_key(c))
    local lost = cjson.decode(stored)
    for i = 1, #lost, 7 do
      tenant(lost[i])
      if owned_entry(group, lost[i + 1], consumer, lost[i + 5]) then
        redis.call('XCLAIM', K[1], group, consumer, 0, lost[i + 1], 'JUSTID')
        for j = i, i + 6 do table.insert(out, lost[j]) end
        recovered = recovered + 1
      end
    end
  end
end

for _, t in ipairs(redis.call('ZRANGEBYSCORE', DUE, '-inf', now, 'LIMIT', 0, look)) do
  tenant(t)
  promote()
  schedule()
  -- Messages put in its stream by other means (a queue adopted from an earlier version).
  if redis.call('XLEN', K[1]) > pending_count() then enter() end
end

local front = redis.call('ZRANGE', READY, 0, count + look - 1, 'WITHSCORES')
local last = tonumber(front[#front]) or 0
local turn = {}  -- {t, w, pass, want}: the tenants that may take more in this call
for i = 1, #front, 2 do
  local t = front[i]
  local w = math.max(1, tonumber(redis.call('HGET', WEIGHTS, t)) or 1)
  if skip[t] then
    redis.call('ZADD', READY, last + 1 / w, t)
  else
    turn[#turn + 1] = {t = t, w = w, pass = tonumber(front[i + 1])}
  end
end
-- Each tenant's share of budget (fairness.shares in Python): its weight's part, rounded
-- down, and the slots left over one each to the tenants whose pass would then be lowest.
local function share(budget)
  local total, left, order = 0, budget, {}
  for i, item in ipairs(turn) do
    total = total + item.w
    order[i] = i
  end
  for _, item in ipairs(turn) do
    item.want = math.floor(budget * item.w / total)
    left = left - item.want
  end
  if left > 0 then
    local function after(i) return turn[i].pass + turn[i].want / turn[i].w end
    table.sort(order, function(a, b)
      if after(a) ~= after(b) then return after(a) < after(b) end
      return a < b
    end)
    for k = 1, left do turn[order[k]].want = turn[order[k]].want + 1 end
  end
end
local left = count - recovered
while left > 0 and #turn > 0 do
  share(left)
  local next_turn = {}
  for _, item in ipairs(turn) do
    local taken, waiting = 0, 1
    if item.want > 0 then
      tenant(item.t)
      taken, waiting = visit(item.want, tonumber(redis.call('HGET', CAPS, item.t)) or default_cap)
      left = left - taken
    end
    if waiting <= 0 then
      redis.call('ZREM', READY, item.t)
      schedule()
    elseif item.want > 0 and taken == 0 then
      -- At its cap: it stays ready, behind the tenants looked at.
      redis.call('ZADD', READY, last + 1 / item.w, item.t)
    else
      if taken > 0 then
        item.pass = item.pass + taken / item.w
        redis.call('ZADD', READY, item.pass, item.t)
      end
      -- Took its share and has more: it may take what others could not.
      if taken == item.want then next_turn[#next_turn + 1] = item end
    end
  end
  turn = next_turn
end

if #out > 0 then redis.call('SET', taken_key(call), cjson.encode(out), 'PX', min_idle) end
local first_due = redis.call('ZRANGE', DUE, 0, 0, 'WITHSCORES')
table.insert(out, 1, tonumber(first_due[2]) or -1)
table.insert(out, 1, now)
return out
"""
)

# ARGV: group, consumer, then id, count pairs. Acknowledges and deletes owned entries.
ACK = (
    COMMON
    + """
local group, consumer = ARGV[1], ARGV[2]
local done = 0
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if owned(group, id, consumer, ARGV[i + 1]) then
    local entry = redis.call('XRANGE', KEYS[1], id, id)
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
    if #entry == 1 then forget(field(entry[1][2], 'run')) end
    done = done + 1
  end
end
return done
"""
)

# ARGV: tenant, group, consumer, id, count, delay_ms, count_delivery (1/0), then what the
# delivery carried: run, priority, total deliveries, traceparent.
# An entry gone from the stream altogether (the queue lost its data: Redis emptied) is put
# back as a new message, so that a run executed through the loss is not left without one. An
# entry still there but no longer this delivery's (reclaimed) is left alone.
RETRY_LATER = (
    COMMON
    + """
T = ARGV[1]
local group, consumer, id = ARGV[2], ARGV[3], ARGV[4]
local fields = owned_entry(group, id, consumer, ARGV[5])
if not fields then
  if #redis.call('XRANGE', KEYS[1], id, id) > 0 then return 0 end
  local d = tonumber(ARGV[10])
  if ARGV[7] ~= '1' then d = d - tonumber(ARGV[5]) end
  redis.call('HINCRBY', KEYS[3], ARGV[8], 1)
  return put(ARGV[8], ARGV[9], d, tonumber(ARGV[6]), ARGV[11])
end
redis.call('XACK', KEYS[1], group, id)
redis.call('XDEL', KEYS[1], id)
local d = 0
if ARGV[7] == '1' then d = tonumber(field(fields, 'd')) + tonumber(ARGV[5]) end
return put(field(fields, 'run'), field(fields, 'p'), d, tonumber(ARGV[6]), field(fields, 'tp'))
"""
)

# ARGV: group, consumer, then id, count pairs. Resets the idle time of owned entries.
EXTEND = (
    COMMON
    + """
local group, consumer = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  if owned(group, ARGV[i], consumer, ARGV[i + 1]) then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, ARGV[i], 'JUSTID')
  end
end
return 1
"""
)

# ARGV: group, consumer, id, count, reason, dead_maxlen. Moves an owned entry to the dead
# letters, parked (its run keeps its live count). Returns 1 if it did.
DEAD_LETTER = (
    COMMON
    + """
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
local fields = owned_entry(group, id, consumer, ARGV[4])
if not fields then return 0 end
local deliveries = tonumber(field(fields, 'd')) + tonumber(ARGV[4])
dead_letter(group, id, field(fields, 'run'), field(fields, 'p'), deliveries, field(fields, 'tp'),
            ARGV[5], '1', ARGV[6])
return 1
"""
)

# ARGV: tenant, dead-letter id. Moves it back to the stream as a fresh message.
REPLAY = (
    COMMON
    + """
T = ARGV[1]
local entry = redis.call('XRANGE', KEYS[4], ARGV[2], ARGV[2])
if #entry == 0 then return 0 end
local fields = entry[1][2]
redis.call('XDEL', KEYS[4], ARGV[2])
-- A parked letter still holds the live count the new message takes over.
if field(fields, 'parked') ~= '1' then redis.call('HINCRBY', KEYS[3], field(fields, 'run'), 1) end
put(field(fields, 'run'), field(fields, 'p'), 0, 0, field(fields, 'tp'))
return 1
"""
)

# KEYS: active (the sorted set of tenants of earlier versions), due. Gives every tenant of it a
# look now, so that messages made ready before the ready set existed are found, and drops it.
ADOPT = (
    COMMON
    + """
local now = now_ms()
for _, t in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('ZADD', KEYS[2], 'NX', now, t)
end
redis.call('DEL', KEYS[1])
return 1
"""
)

# KEYS: epoch. ARGV: a new random id.
# The identity of the queue's data set, "<id>|<run_id>", run_id being that of the server
# process that made it. Missing (FLUSHALL, a restart without persistence) or made by another
# server process (a restart from a snapshot, a failover to a replica: the last writes may be
# lost), it is made anew. Returns it, and 1 if this call made it.
EPOCH = """
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local epoch = redis.call('GET', KEYS[1])
if epoch and string.sub(epoch, -#run_id - 1) == '|' .. run_id then return {epoch, 0} end
epoch = ARGV[1] .. '|' .. run_id
redis.call('SET', KEYS[1], epoch)
return {epoch, 1}
"""
