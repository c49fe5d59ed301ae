-- include: breaker_common.lua
-- KEYS: a breaker's (breaker_common.lua). ARGV: probe id ('' for an ordinary call), failed,
-- slow (0/1), window type, window size, minimum calls, failure rate, slow rate, half-open
-- calls.
-- Returns the state after the call, or 'late' for a probe that no longer held its lease (its
-- answer is not counted).
local now = now_ms()
local probe, failed, slow = ARGV[1], ARGV[2], ARGV[3]
local kind, size, minimum = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local failure_rate, slow_rate, half = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if probe ~= '' then
  local lease_end = redis.call('ZSCORE', KEYS[3], probe)
  redis.call('ZREM', KEYS[3], probe)
  if state ~= 'half_open' or not lease_end or tonumber(lease_end) <= now then return 'late' end
  local n = redis.call('HINCRBY', KEYS[1], 'probe_n', 1)
  local f = redis.call('HINCRBY', KEYS[1], 'probe_f', tonumber(failed))
  local s = redis.call('HINCRBY', KEYS[1], 'probe_s', tonumber(slow))
  if n >= half then
    redis.call('DEL', KEYS[2], KEYS[3])
    if trips(n, f, s, failure_rate, slow_rate) then
      redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
      return 'open'
    end
    redis.call('HSET', KEYS[1], 'state', 'closed')
    return 'closed'
  end
  return state
end
if state ~= 'closed' then return state end
if kind == 'count' then
  redis.call('LPUSH', KEYS[2], failed .. '|' .. slow)
else
  local second = tostring(math.floor(now / 1000))
  local cur = redis.call('HGET', KEYS[2], second) or '0|0|0'
  local n, f, s = string.match(cur, '^(%d+)|(%d+)|(%d+)$')
  redis.call('HSET', KEYS[2], second, (tonumber(n) + 1) .. '|' .. (tonumber(f) + tonumber(failed))
             .. '|' .. (tonumber(s) + tonumber(slow)))
  redis.call('PEXPIRE', KEYS[2], (size + 1) * 1000)
end
local calls, failures, slows = window(kind, size, now)
if calls >= minimum and trips(calls, failures, slows, failure_rate, slow_rate) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
  redis.call('DEL', KEYS[2])
  return 'open'
end
return 'closed'
