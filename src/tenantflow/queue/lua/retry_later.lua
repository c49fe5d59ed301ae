-- include: common.lua
-- KEYS: a tenant's queue (common.lua). ARGV: tenant, group, consumer, id, count, delay_ms,
-- count_delivery (1/0), then what the delivery carried: run, priority, total deliveries,
-- traceparent.
-- An entry gone from the stream altogether (the queue lost its data: Redis emptied) is put
-- back as a new message, so that a run executed through the loss is not left without one. An
-- entry still there but no longer this delivery's (reclaimed) is left alone (returns 0).
-- Returns the time (ms) the message becomes ready.
T = ARGV[1]
local group, consumer, id = ARGV[2], ARGV[3], ARGV[4]
local fields = owned_entry(group, id, consumer, ARGV[5])
if not fields then
  if #redis.call('XRANGE', KEYS[1], id, id) > 0 then return 0 end
  local d = tonumber(ARGV[10])
  if ARGV[7] ~= '1' then d = d - tonumber(ARGV[5]) end
  redis.call('HINCRBY', KEYS[3], ARGV[8], 1)
  return put(ARGV[8], ARGV[9], d, tonumber(ARGV[6]), ARGV[11])
end
redis.call('XACK', KEYS[1], group, id)
redis.call('XDEL', KEYS[1], id)
local d = 0
if ARGV[7] == '1' then d = tonumber(field(fields, 'd')) + tonumber(ARGV[5]) end
return put(field(fields, 'run'), field(fields, 'p'), d, tonumber(ARGV[6]), field(fields, 'tp'))
