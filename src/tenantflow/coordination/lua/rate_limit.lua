-- The generic cell rate algorithm (GCRA) of one limit.
-- KEYS[1] the limit's theoretical arrival time (ms, Redis clock), expiring once in the past.
-- ARGV: interval_ms (between two requests at the rate), tolerance_ms (interval times burst - 1).
-- Returns 'ok', or the ms to wait (a string: Lua numbers lose their fraction on the way out).
local now = now_ms()
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then return tostring(tat - tolerance - now) end
local next_tat = tat + interval
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil(next_tat - now) + 1000)
return 'ok'
