-- include: breaker_common.lua
-- KEYS: a breaker's (breaker_common.lua). ARGV: wait_open_ms, half_open_calls, probe id, probe
-- lease ms, retry ms when the half-open slots are taken.
-- Returns {allowed (0/1), probe (0/1), retry_after_ms}.
local now = now_ms()
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'open' then
  local waited = now - tonumber(redis.call('HGET', KEYS[1], 'opened_at'))
  if waited < tonumber(ARGV[1]) then return {0, 0, tonumber(ARGV[1]) - waited} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_n', 0, 'probe_f', 0, 'probe_s', 0)
  redis.call('DEL', KEYS[3])
  state = 'half_open'
end
if state == 'half_open' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)  -- the leases of lost probes end
  local answered = tonumber(redis.call('HGET', KEYS[1], 'probe_n') or '0')
  if answered + redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[2]) then
    return {0, 0, tonumber(ARGV[5])}
  end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]) + 1000)
  return {1, 1, 0}
end
return {1, 0, 0}
