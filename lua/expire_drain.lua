--#include node
-- expire_drain: the drain deadline passed; what is still assigned goes back to
-- dispatch now, and the node goes offline.
--
-- KEYS: the node bundle
-- P: node_id, now_ms, wake_channel
-- Writes: K.node, K.liveness, K.warmup, K[status], K.queue, K.node_transitions, K.transitions,
--         K.capacity_index, K.drains, K.lost, K.offline_since
-- Returns: {"drained", jobs handed back} | {"gone"}: not draining, or not yet due

local fields = redis.call('HMGET', K.node, 'status', 'drain_deadline_ms')
if fields[1] ~= NodeStatus.DRAINING then
  redis.call('ZREM', K.drains, P.node_id)
  return {'gone'}
end
if fields[2] == false or fields[2] == '' or tonumber(fields[2]) > P.now_ms then return {'gone'} end
local jobs = redis.call('HLEN', K.assigned)
finish_drain(P.node_id, 'drain deadline passed with ' .. jobs .. (jobs == 1 and ' job' or ' jobs') .. ' left',
  P.now_ms, FailureCode.DRAIN_DEADLINE)
if jobs > 0 then
  -- Lost right away: the next lost-node pass re-dispatches them elsewhere.
  redis.call('ZADD', K.lost, P.now_ms, P.node_id)
end
return {'drained', jobs}
