--#include node
-- undrain_node: end a drain. A draining node returns to ready (or degraded,
-- when its last health check failed). A node already drained offline has its
-- session closed, so that it registers again and warms up afresh. A node still cooling
-- down after a JobFailures degradation returns to degraded.
--
-- KEYS: the node bundle
-- P: node_id, now_ms, requested_by, wake_channel
-- Writes: K.node, K.liveness, K.warmup, K[status], K.queue, K.node_transitions, K.transitions,
--         K.capacity_index, K.drains, K.offline_since
-- Returns: {"resumed", status} | {"reconnect"} | {"refused", status} | {"unknown"}
--          {"cancelled"}: the node is away mid-drain; it will not drain when it comes back

local fields = redis.call('HMGET', K.node, 'status', 'last_healthy', 'drain_outcome', 'drain_pending',
  'job_cooldown_until_ms')
local status = fields[1]
if status == false then return {'unknown'} end
-- (drain_outcome's words, 'cancelled' among them, are the drain's: not a job state)
local reason = 'drain ended by ' .. P.requested_by
if status == NodeStatus.DRAINING then
  redis.call('ZREM', K.drains, P.node_id)
  redis.call('HSET', K.node, 'drain_ended_ms', P.now_ms, 'drain_outcome', 'cancelled', 'drain_pending', '0')
  local to = (fields[2] == '0' or cooling_down(fields[5], P.now_ms)) and NodeStatus.DEGRADED or NodeStatus.READY
  transition(P.node_id, to, reason, P.now_ms)
  return {'resumed', to}
end
if status == NodeStatus.OFFLINE and fields[3] == 'drained' then
  redis.call('HSET', K.node, 'drain_outcome', 'undrained')
  end_session(P.node_id, CloseCode.NODE_OFFLINE, 'drain ended: register again')
  return {'reconnect'}
end
if fields[4] == '1' then
  -- dropped out while draining: the drain is called off before it comes back
  redis.call('HSET', K.node, 'drain_ended_ms', P.now_ms, 'drain_outcome', 'cancelled', 'drain_pending', '0')
  return {'cancelled'}
end
return {'refused', status}
