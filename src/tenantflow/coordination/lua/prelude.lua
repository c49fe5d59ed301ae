-- Prepended to every script (``coordination.scripts``): the helpers all of them share.
-- now_ms(): the Redis server's clock in ms. Every lease and wait of a script is measured on it,
-- never on a client's, so processes whose clocks disagree still agree on when a lease ends.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
