"""Lua scripts of the Redis Streams queue: every multi-key change of a tenant's queue is one
atomic script. Times come from the Redis clock (``TIME``), never from the callers' clocks.

Key layout (``keys.TenantKeys``), the same for every script:
    KEYS[1] stream    XADD'd messages: fields run, p (priority), d (deliveries before this entry),
                      tp (the W3C traceparent of the run's origin; absent when not traced)
    KEYS[2] delayed   ZSET member "uid|run|p|d", or "uid|run|p|d|tp" with a trace; score = due
                      time (ms)
    KEYS[3] live      HASH run -> live messages of that run (a parked dead letter counts)
    KEYS[4] dead      dead-letter stream (capped): fields run, p, deliveries, at, tp, reason,
                      parked ('1': it holds its run's live count until replayed)
    KEYS[5] seq       INCR counter for delayed members
A delivery's receipt is (consumer, Redis delivery count); ack, retry and extend act only when the
pending entry still belongs to that consumer with that count, so a late call from a consumer
whose message was reclaimed changes nothing.
"""

from __future__ import annotations

COMMON = """
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
  if redis.call('HINCRBY', KEYS[3], run, -1) <= 0 then redis.call('HDEL', KEYS[3], run) end
end
local function owned(group, id, consumer, count)
  -- pcall: after the stream or its group vanished (Redis emptied), nothing is owned.
  local p = redis.pcall('XPENDING', KEYS[1], group, id, id, 1)
  if type(p) ~= 'table' or p.err then return false end
  return #p == 1 and p[1][2] == consumer and tonumber(p[1][4]) == tonumber(count)
end
-- The fields of an entry that this delivery (consumer, count) still owns; nil if it does not,
-- or if the entry is gone (then its pending entry is acknowledged).
local function owned_entry(group, id, consumer, count)
  if not owned(group, id, consumer, count) then return nil end
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if #entry == 0 then
    redis.call('XACK', KEYS[1], group, id)
    return nil
  end
  return entry[1][2]
end
-- Moves entry id of the stream to the dead letters. Trimmed one entry at a time rather than
-- with MAXLEN ~, so that a parked letter trimmed away gives up its run's live count.
local function dead_letter(group, id, run, p, deliveries, tp, reason, parked, maxlen)
  if redis.call('XLEN', KEYS[4]) >= tonumber(maxlen) then
    local oldest = redis.call('XRANGE', KEYS[4], '-', '+', 'COUNT', 1)
    if #oldest == 1 then
      if field(oldest[1][2], 'parked') == '1' then forget(field(oldest[1][2], 'run')) end
      redis.call('XDEL', KEYS[4], oldest[1][1])
    end
  end
  redis.call('XADD', KEYS[4], '*', 'run', run, 'p', p, 'deliveries', deliveries,
             'at', now_ms(), 'tp', tp or '', 'reason', reason, 'parked', parked)
  redis.call('XACK', KEYS[1], group, id)
  redis.call('XDEL', KEYS[1], id)
  if parked ~= '1' then forget(run) end
end
local function put(run, p, d, delay, tp)
  tp = tp or ''
  if delay > 0 then
    local uid = redis.call('INCR', KEYS[5])
    local due = now_ms() + delay
    local member = uid .. '|' .. run .. '|' .. p .. '|' .. d
    -- Untraced members keep the four parts that workers of earlier versions read.
    if tp ~= '' then member = member .. '|' .. tp end
    redis.call('ZADD', KEYS[2], due, member)
    return due
  end
  if tp == '' then
    redis.call('XADD', KEYS[1], '*', 'run', run, 'p', p, 'd', d)
  else
    redis.call('XADD', KEYS[1], '*', 'run', run, 'p', p, 'd', d, 'tp', tp)
  end
  return now_ms()
end
"""

# ARGV: delay_ms, then run, priority, traceparent ('' for none) for each message. Returns the
# time (ms) the messages become ready.
ENQUEUE = (
    COMMON
    + """
local delay, at = tonumber(ARGV[1]), 0
for i = 2, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[3], ARGV[i], 1)
  at = put(ARGV[i], ARGV[i + 1], 0, delay, ARGV[i + 2])
end
return at
"""
)

# ARGV: group, consumer, count, min_idle_ms, max_deliveries, inflight_cap (0: none; below 0:
#       take no new message),
#       dead_maxlen.
# Promotes due delayed messages, reclaims messages idle past min_idle (dead-lettering those
# delivered max_deliveries times), then reads new ones. Returns a flat list of
# id, run, priority, total deliveries, Redis delivery count, traceparent ('' for none); per
# message.
DEQUEUE = (
    COMMON
    + """
local group, consumer = ARGV[1], ARGV[2]
local count, min_idle, max_deliveries = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local cap, dead_maxlen = tonumber(ARGV[6]), ARGV[7]
local now = now_ms()
local function exhausted(id, run, p, deliveries, tp)
  local times = deliveries == 1 and ' time' or ' times'
  local reason = 'delivered ' .. deliveries .. times .. ' without being acknowledged'
  dead_letter(group, id, run, p, deliveries, tp, reason, '0', dead_maxlen)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 500)
for _, member in ipairs(due) do
  -- Four parts, or five with a trace.
  local uid, run, p, d, tp = string.match(member, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|?(.*)$')
  put(run, p, d, 0, tp)
  redis.call('ZREM', KEYS[2], member)
end
redis.pcall('XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
local out = {}
local idle = redis.call('XPENDING', KEYS[1], group, 'IDLE', min_idle, '-', '+', count)
for _, pe in ipairs(idle) do
  local id, deliveries = pe[1], tonumber(pe[4])
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if #entry == 0 then
    redis.call('XACK', KEYS[1], group, id)
  else
    local fields = entry[1][2]
    local run, p, d = field(fields, 'run'), field(fields, 'p'), tonumber(field(fields, 'd'))
    local tp = field(fields, 'tp') or ''
    if deliveries + d >= max_deliveries then
      exhausted(id, run, p, deliveries + d, tp)
    else
      local claimed = redis.call('XCLAIM', KEYS[1], group, consumer, min_idle, id)
      if #claimed == 1 then
        table.insert(out, id); table.insert(out, run); table.insert(out, p)
        table.insert(out, deliveries + 1 + d); table.insert(out, deliveries + 1)
        table.insert(out, tp)
      end
    end
  end
end
local room = count - #out / 6
if cap ~= 0 then
  -- In flight = the group's pending entries (reclaimed ones included), cluster-wide.
  local pending = tonumber(redis.call('XPENDING', KEYS[1], group)[1])
  room = math.min(room, cap - pending)
end
room = math.floor(room)
if room > 0 then
  local fresh = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', room,
                           'STREAMS', KEYS[1], '>')
  if fresh then
    for _, entry in ipairs(fresh[1][2]) do
      local fields = entry[2]
      local run, p, d = field(fields, 'run'), field(fields, 'p'), tonumber(field(fields, 'd'))
      local tp = field(fields, 'tp') or ''
      if d >= max_deliveries then
        exhausted(entry[1], run, p, d, tp)
      else
        table.insert(out, entry[1]); table.insert(out, run)
        table.insert(out, p); table.insert(out, d + 1); table.insert(out, 1)
        table.insert(out, tp)
      end
    end
  end
end
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

# ARGV: group, consumer, id, count, delay_ms, count_delivery (1/0).
RETRY_LATER = (
    COMMON
    + """
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
local fields = owned_entry(group, id, consumer, ARGV[4])
if not fields then return 0 end
redis.call('XACK', KEYS[1], group, id)
redis.call('XDEL', KEYS[1], id)
local d = 0
if ARGV[6] == '1' then d = tonumber(field(fields, 'd')) + tonumber(ARGV[4]) end
return put(field(fields, 'run'), field(fields, 'p'), d, tonumber(ARGV[5]), field(fields, 'tp'))
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

# ARGV: dead-letter id. Moves it back to the stream as a fresh message.
REPLAY = (
    COMMON
    + """
local entry = redis.call('XRANGE', KEYS[4], ARGV[1], ARGV[1])
if #entry == 0 then return 0 end
local fields = entry[1][2]
redis.call('XDEL', KEYS[4], ARGV[1])
-- A parked letter still holds the live count the new message takes over.
if field(fields, 'parked') ~= '1' then redis.call('HINCRBY', KEYS[3], field(fields, 'run'), 1) end
put(field(fields, 'run'), field(fields, 'p'), 0, 0, field(fields, 'tp'))
return 1
"""
)
