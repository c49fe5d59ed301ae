-- include: common.lua
-- KEYS: a tenant's queue (common.lua). ARGV: group, consumer, then id, count pairs.
-- Resets the idle time of owned entries. Returns 1.
local group, consumer = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  if owned(group, ARGV[i], consumer, ARGV[i + 1]) then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, ARGV[i], 'JUSTID')
  end
end
return 1
