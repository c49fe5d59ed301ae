-- KEYS[1] the lock (see lock_acquire.lua). ARGV: token.
-- Frees the lock if the token holds it. Returns 1 if it did, else 0.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
