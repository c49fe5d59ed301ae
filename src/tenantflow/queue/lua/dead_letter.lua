-- include: common.lua
-- KEYS: a tenant's queue (common.lua). ARGV: group, consumer, id, count, reason, dead_maxlen.
-- Moves an owned entry to the dead letters, parked (its run keeps its live count). Returns 1
-- if it did.
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
local fields = owned_entry(group, id, consumer, ARGV[4])
if not fields then return 0 end
local deliveries = tonumber(field(fields, 'd')) + tonumber(ARGV[4])
dead_letter(group, id, field(fields, 'run'), field(fields, 'p'), deliveries, field(fields, 'tp'),
            ARGV[5], '1', ARGV[6])
return 1
