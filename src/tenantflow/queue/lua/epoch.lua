-- KEYS: epoch. ARGV: a new random id.
-- The identity of the queue's data set, "<id>|<run_id>", run_id being that of the server
-- process that made it. Missing (FLUSHALL, a restart without persistence) or made by another
-- server process (a restart from a snapshot, a failover to a replica: the last writes may be
-- lost), it is made anew. Returns it, and 1 if this call made it.
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local epoch = redis.call('GET', KEYS[1])
if epoch and string.sub(epoch, -#run_id - 1) == '|' .. run_id then return {epoch, 0} end
epoch = ARGV[1] .. '|' .. run_id
redis.call('SET', KEYS[1], epoch)
return {epoch, 1}
