-- KEYS[1] the bulkhead's holders: member = slot id, score = lease end (ms, Redis clock); a
-- lease that has ended is no longer counted, and its slot goes to the next caller.
-- ARGV: slot id, max concurrent, lease ms.
-- Returns 1 if the slot was taken, else the ms until the earliest lease ends (an upper bound
-- on the wait), negated.
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 1000)
  return 1
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return -(tonumber(first[2]) - now)
