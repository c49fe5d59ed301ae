-- include: common.lua
-- KEYS: ready, due, caps (HASH tenant -> cap on messages in flight: 0 none, below 0 take
--       nothing), weights (HASH tenant -> share, default 1); each tenant's keys are reached by
--       name: ARGV[1] .. ':{t:<tenant>}:' .. stream|delayed|live|dead|seq (``keys.Keys.tenant``).
-- ARGV: prefix, group, consumer, count, min_idle_ms, max_deliveries, default cap, dead_maxlen,
--       look (how many tenants beyond count one call may examine), this call's id, n, then n
--       ids of calls whose replies arrived, m, then m ids of calls whose replies did not, then
--       tenants to skip.
-- A call that delivers keeps its deliveries under ARGV[1] .. ':taken:' .. consumer .. ':' ..
-- id (``keys.Keys.taken``) for min_idle_ms, dropped once its reply arrived. First it delivers
-- again those of calls whose replies were lost (a connection reset after the script ran) that
-- are still this consumer's with the same count, so they are served now, not reclaimed a lease
-- later. Then gives the tenants due for a look theirs (delayed messages made ready, lapsed
-- leases found), then serves the tenants at the front of the ready set, each its share of
-- count by its weight and pass (``fairness``; reclaimed messages first), moving each on by
-- what it took over its weight; a tenant skipped or at its cap stays ready but moves behind
-- the tenants looked at, so a call looks at no more than count + look tenants and none holds
-- up the others.
-- Returns the Redis time (ms), the time of the next look due (-1: none), then per message:
-- tenant, id, run, priority, total deliveries, Redis delivery count, traceparent ('' for none).
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
