-- Included by every script of a tenant's queue (``-- include: common.lua``): its helpers.
-- Key layout (``keys.TenantKeys`` then ``keys.Keys``) of the scripts of one tenant:
--   KEYS[1] stream    XADD'd messages: fields run, p (priority), d (deliveries before this
--                     entry), tp (the W3C traceparent of the run's origin; absent untraced)
--   KEYS[2] delayed   ZSET member "uid|run|p|d", or "uid|run|p|d|tp" with a trace; score =
--                     due time (ms)
--   KEYS[3] live      HASH run -> live messages of that run (a parked dead letter counts)
--   KEYS[4] dead      dead-letter stream (capped): fields run, p, deliveries, at, tp, reason,
--                     parked ('1': it holds its run's live count until replayed)
--   KEYS[5] seq       INCR counter for delayed members
--   KEYS[6] ready     ZSET, across tenants: tenant -> its pass (weighted round robin)
--   KEYS[7] due       ZSET, across tenants: tenant -> when (ms) it needs a look
-- DISPATCH reaches the tenants' keys by name instead (see dispatch.lua).
-- The keys and tenant being worked on: a tenant's script's own, or DISPATCH's current tenant.
local K, T = KEYS, nil
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
