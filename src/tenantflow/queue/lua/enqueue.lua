-- include: common.lua
-- KEYS: a tenant's queue (common.lua). ARGV: tenant, then run, priority, traceparent ('' for
-- none), delay_ms for each message.
-- Returns the time (ms) the last message becomes ready.
T = ARGV[1]
local at = 0
for i = 2, #ARGV, 4 do
  redis.call('HINCRBY', KEYS[3], ARGV[i], 1)
  at = put(ARGV[i], ARGV[i + 1], 0, tonumber(ARGV[i + 3]), ARGV[i + 2])
end
return at
