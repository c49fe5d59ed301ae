-- KEYS[1] the lock: a string holding its holder's token, expiring (PX) when the lease ends.
-- ARGV: token, lease ms.
-- Takes the lock when free, or renews it when ARGV[1] holds it already. Returns 1 if the
-- token holds the lock now, else 0.
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
