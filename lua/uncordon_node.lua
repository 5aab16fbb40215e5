--#include node
-- uncordon_node: end a cordon. A ready node with a free slot is back in the
-- capacity index at once; a node in another status gets there when it turns ready.
--
-- KEYS: the node bundle, then the set of cordoned nodes
-- P: node_id, now_ms
-- Writes: K.node, K.capacity_index; and KEYS[NEXT], the set of cordoned nodes
-- Returns: {"uncordoned", status} | {"not_cordoned", status} | {"unknown"}

local n = redis.call('HMGET', K.node, 'status', 'cordoned')
if n[1] == false then return {'unknown'} end
redis.call('SREM', KEYS[NEXT], P.node_id)
if n[2] ~= '1' then return {'not_cordoned', n[1]} end
redis.call('HDEL', K.node, 'cordoned', 'cordon_reason', 'cordoned_by', 'cordoned_ms')
if n[1] == NodeStatus.READY then refresh_capacity(P.node_id, P.now_ms) end
return {'uncordoned', n[1]}
