-- KEYS[1] the bulkhead's holders (see bulkhead_take.lua). ARGV: slot id.
-- Gives the slot back. Returns 1 if it was still held, else 0.
return redis.call('ZREM', KEYS[1], ARGV[1])
