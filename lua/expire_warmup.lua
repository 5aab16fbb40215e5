--#include node
-- expire_warmup: a node still registering when the warmup timeout has passed
-- and whose last health check failed (or that has not sent one) is degraded.
--
-- KEYS: the node bundle
-- P: node_id, now_ms, warmup_ms, wake_channel
-- Writes: K.node, K.liveness, K.warmup, K[status], K.queue, K.node_transitions, K.transitions,
--         K.capacity_index, K.drains, K.offline_since
-- Returns: {"degraded", reason} | {"waiting"}: still within warmup, or healthy so far | {"gone"}

local fields = redis.call('HMGET', K.node, 'status', 'status_since_ms', 'last_healthy', 'last_health_reason')
if fields[1] ~= NodeStatus.REGISTERING then
  redis.call('ZREM', K.warmup, P.node_id)
  return {'gone'}
end
-- ('waiting' here: for the warmup to end, not a job's state)
if P.now_ms - tonumber(fields[2]) < P.warmup_ms or fields[3] == '1' then return {'waiting'} end
local reason = 'warmup timeout: not healthy ' .. math.floor(P.warmup_ms / 1000) ..
  ' s after registration (' .. (fields[4] or 'no heartbeat yet') .. ')'
transition(P.node_id, NodeStatus.DEGRADED, reason, P.now_ms)
return {NodeStatus.DEGRADED, reason}
