-- include: common.lua
-- KEYS: a tenant's queue (common.lua). ARGV: tenant, dead-letter id.
-- Moves it back to the stream as a fresh message. Returns 1 if it did.
T = ARGV[1]
local entry = redis.call('XRANGE', KEYS[4], ARGV[2], ARGV[2])
if #entry == 0 then return 0 end
local fields = entry[1][2]
redis.call('XDEL', KEYS[4], ARGV[2])
-- A parked letter still holds the live count the new message takes over.
if field(fields, 'parked') ~= '1' then redis.call('HINCRBY', KEYS[3], field(fields, 'run'), 1) end
put(field(fields, 'run'), field(fields, 'p'), 0, 0, field(fields, 'tp'))
return 1
