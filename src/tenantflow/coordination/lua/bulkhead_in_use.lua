-- KEYS[1] the bulkhead's holders (see bulkhead_take.lua). No ARGV.
-- Returns how many slots are held (leases not yet ended).
return redis.call('ZCOUNT', KEYS[1], '(' .. now_ms(), '+inf')
