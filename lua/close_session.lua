--#include node
-- close_session: the node's session ended; take the node offline unless a
-- newer session already took it over.
--
-- KEYS: the node bundle
-- P: node_id, session_id, reason, now_ms, wake_channel, reassign_grace_ms
-- Writes: K.node, K.liveness, K.warmup, K[status], K.queue, K.node_transitions, K.transitions,
--         K.capacity_index, K.drains, K.lost, K.offline_since
-- Returns: {"offline", previous status} | {"ignored"}: unknown node, another session, or already offline

local fields = redis.call('HMGET', K.node, 'session_id', 'status')
if fields[1] ~= P.session_id then return {'ignored'} end
redis.call('HSET', K.node, 'connected', '0')
if fields[2] == NodeStatus.OFFLINE then return {'ignored'} end
go_offline(P.node_id, P.reason, P.now_ms, P.reassign_grace_ms)
return {NodeStatus.OFFLINE, fields[2]}
