--#include node
-- cordon_node: keep a node from new jobs without changing its status (Kubernetes'
-- cordon): it keeps its session, its status and the jobs it has; it leaves the
-- capacity index, which every dispatch reads, and stays out of it until uncordoned
-- (refresh_capacity_of and release_slot read `cordoned`). Cordoning a cordoned node
-- records the new reason.
--
-- KEYS: the node bundle, then the set of cordoned nodes
-- P: node_id, now_ms, requested_by, reason
-- Writes: K.node, K.capacity_index; and KEYS[NEXT], the set of cordoned nodes
-- Returns: {"cordoned", status, "1" when it already was, else "0"} | {"unknown"}

local status = redis.call('HGET', K.node, 'status')
if status == false then return {'unknown'} end
local already = redis.call('SADD', KEYS[NEXT], P.node_id) == 0
redis.call('HSET', K.node, 'cordoned', '1', 'cordon_reason', P.reason, 'cordoned_by', P.requested_by,
  'cordoned_ms', P.now_ms)
redis.call('ZREM', K.capacity_index, P.node_id)
return {'cordoned', status, already and '1' or '0'}
