-- include: breaker_common.lua
-- KEYS: a breaker's (breaker_common.lua). ARGV: window type, window size, wait_open_ms.
-- Returns {state, calls, failures, slow, retry_after_ms}.
local now = now_ms()
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local calls, failures, slow = window(ARGV[1], tonumber(ARGV[2]), now)
local retry = 0
if state == 'open' then
  local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at'))
  retry = math.max(0, tonumber(ARGV[3]) - (now - opened))
end
return {state, calls, failures, slow, retry}
