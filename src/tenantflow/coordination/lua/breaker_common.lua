-- Included by the breaker's scripts (``-- include: breaker_common.lua``). Their key layout:
--   KEYS[1] the breaker's hash: state, opened_at (ms), and while half-open the probes' answers
--           so far: probe_n (how many), probe_f (failed), probe_s (slow)
--   KEYS[2] its window: a list of "f|s" outcomes (count-based) or a hash second -> "n|f|s"
--           (time-based)
--   KEYS[3] the half-open probes in flight: a sorted set, member = probe id, score = the end
--           of its lease (ms); a lease that has ended frees its slot for the next caller
-- Times are the Redis clock's. Each script is one atomic change of one breaker.
local function trips(calls, failures, slow, failure_rate, slow_rate)
  return (100 * failures / calls >= failure_rate) or (100 * slow / calls >= slow_rate)
end
-- window: {calls, failures, slow} of the sliding window, dropping what fell out of it
local function window(kind, size, now)
  local calls, failures, slow = 0, 0, 0
  if kind == 'count' then
    redis.call('LTRIM', KEYS[2], 0, size - 1)
    for _, v in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
      calls = calls + 1
      if string.sub(v, 1, 1) == '1' then failures = failures + 1 end
      if string.sub(v, 3, 3) == '1' then slow = slow + 1 end
    end
  else
    local oldest = math.floor(now / 1000) - size
    local all = redis.call('HGETALL', KEYS[2])
    for i = 1, #all, 2 do
      if tonumber(all[i]) <= oldest then
        redis.call('HDEL', KEYS[2], all[i])
      else
        local n, f, s = string.match(all[i + 1], '^(%d+)|(%d+)|(%d+)$')
        calls = calls + tonumber(n); failures = failures + tonumber(f); slow = slow + tonumber(s)
      end
    end
  end
  return calls, failures, slow
end
