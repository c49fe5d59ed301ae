-- include: common.lua
-- KEYS: a tenant's queue (common.lua). ARGV: group, consumer, then id, count pairs.
-- Acknowledges and deletes owned entries. Returns how many.
local group, consumer = ARGV[1], ARGV[2]
local done = 0
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if owned(group, id, consumer, ARGV[i + 1]) then
    local entry = redis.call('XRANGE', KEYS[1], id, id)
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
    if #entry == 1 then forget(field(entry[1][2], 'run')) end
    done = done + 1
  end
end
return done
