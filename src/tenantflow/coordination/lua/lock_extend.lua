-- KEYS[1] the lock (see lock_acquire.lua). ARGV: token, lease ms.
-- Renews the lease of its holder only. Returns 1 if it did, 0 if the token no longer holds
-- the lock (its lease ended, and perhaps another took it).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
