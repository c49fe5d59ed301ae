-- KEYS: an attempt's counts (its account's, its address's), each a hash: n (failures), until
-- (ms on the Redis clock before which attempts are refused). ARGV[1]: 'check' or 'fail';
-- ARGV[2]: the longest lock-out (ms), also how long failures are remembered after the last;
-- ARGV[3..]: each key's failures before lock-outs begin.
-- Returns, for check: 'ok', or the ms to wait (a string: Lua numbers lose their fraction on
-- the way out); for fail: per key, its lock-out now (ms, '0': none) and its failures.
-- forget: deletes the keys; returns 1.
local now = now_ms()
if ARGV[1] == 'forget' then
  redis.call('DEL', unpack(KEYS))
  return 1
end
local longest = tonumber(ARGV[2])
if ARGV[1] == 'check' then
  local wait = 0
  for _, key in ipairs(KEYS) do
    local left = tonumber(redis.call('HGET', key, 'until') or '0') - now
    if left > wait then wait = left end
  end
  if wait > 0 then return tostring(wait) end
  return 'ok'
end
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('HINCRBY', key, 'n', 1)
  local over = n - tonumber(ARGV[2 + i])
  local lock = 0
  if over > 0 then
    lock = math.min(longest, ARGV[3 + #KEYS] * 2 ^ math.min(over - 1, 40))
    redis.call('HSET', key, 'until', tostring(now + lock))
  end
  redis.call('PEXPIRE', key, longest)
  out[#out + 1] = tostring(lock)
  out[#out + 1] = n
end
return out
