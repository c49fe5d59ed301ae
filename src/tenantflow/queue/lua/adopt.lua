-- KEYS: active (the sorted set of tenants of earlier versions), due. No ARGV.
-- Gives every tenant of it a look now, so that messages made ready before the ready set
-- existed are found, and drops it. Returns 1.
local now = now_ms()
for _, t in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('ZADD', KEYS[2], 'NX', now, t)
end
redis.call('DEL', KEYS[1])
return 1
