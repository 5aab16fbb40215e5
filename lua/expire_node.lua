--#include node
-- expire_node: take a node offline when it has not been seen for the
-- heartbeat timeout. Checks again under the script's atomicity, so a
-- heartbeat that arrived after the scan read the liveness index wins, and two
-- scans expiring the same node do it once.
--
-- KEYS: the node bundle
-- P: node_id, now_ms, timeout_ms, wake_channel, reassign_grace_ms
-- Writes: K.node, K.liveness, K.warmup, K[status], K.queue, K.node_transitions, K.transitions,
--         K.capacity_index, K.drains, K.lost, K.offline_since
-- Returns: {"offline", previous status, reason} | {"alive"} | {"gone"}: not a live node

local fields = redis.call('HMGET', K.node, 'status', 'last_seen_ms')
if fields[1] == false or fields[1] == NodeStatus.OFFLINE then
  redis.call('ZREM', K.liveness, P.node_id)
  return {'gone'}
end
local silent_ms = P.now_ms - tonumber(fields[2])
if silent_ms < P.timeout_ms then return {'alive'} end
local reason = 'no heartbeat for ' .. math.floor(silent_ms / 1000) .. ' s'
go_offline(P.node_id, reason, P.now_ms, P.reassign_grace_ms)
end_session(P.node_id, CloseCode.NODE_OFFLINE, 'node is offline (' .. reason .. '): register again')
return {NodeStatus.OFFLINE, fields[1], reason}
