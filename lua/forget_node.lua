--#include node
-- forget_node: delete a node nobody has heard from for the retention: offline,
-- not seen (a drained node keeps heartbeating) and with no job assigned. Its
-- record, queue, history and every index entry go; should it come back, it
-- registers as a new node under the same id.
--
-- An operator may ask the same of an offline node at once (DELETE /api/nodes/<id>):
-- then the retention is 0, or the heartbeat timeout while its session is open (a
-- drained node's), so that a node whose agent still runs is kept.
--
-- KEYS: the node bundle, then one model index key per P.index_models entry,
--       then one label index key per P.index_labels entry, then the set of cordoned nodes.
-- P: node_id, now_ms, retention_ms, expected_models / expected_labels (the
--    stored JSON texts the caller read), index_models (list), index_labels
--    (list of "key=value")
-- Writes: K.node, K.nodes, K.liveness, K.warmup, K[status], K.queue, K.node_transitions,
--         K.gpu_index, K.public_index, K.resources_index, K.capacity_index, K.assigned, K.cancels,
--         K.drains, K.lost, K.offline_since; and every key after the bundle (model and label
--         indexes, the set of cordoned nodes)
-- Returns: {"forgotten"} | {"kept", "seen" | "jobs"}: not due yet (checked again later):
--          heard from within the retention, or jobs still assigned
--          {"gone", status}: not an offline node | {"retry"}: its models or labels changed since the caller read them

local node_id, now = P.node_id, P.now_ms
local n = redis.call('HMGET', K.node, 'status', 'last_seen_ms', 'models', 'labels')
if n[1] ~= NodeStatus.OFFLINE then
  redis.call('ZREM', K.offline_since, node_id)
  return {'gone', n[1] or 'unknown'}
end
if (n[3] or cjson.null) ~= P.expected_models or (n[4] or cjson.null) ~= P.expected_labels then return {'retry'} end
local seen_ms = tonumber(n[2]) or 0
if now - seen_ms < P.retention_ms then
  redis.call('ZADD', K.offline_since, seen_ms, node_id)
  return {'kept', 'seen'}
end
if redis.call('HLEN', K.assigned) > 0 then
  -- Its jobs are still waiting to be taken back (the lost-node grace): later.
  redis.call('ZADD', K.offline_since, now, node_id)
  return {'kept', 'jobs'}
end

for i = NEXT, #KEYS do redis.call('SREM', KEYS[i], node_id) end
for _, status in ipairs(NODE_STATUSES) do redis.call('SREM', status_key(status), node_id) end
for _, key in ipairs({K.gpu_index, K.public_index, K.resources_index}) do
  redis.call('SREM', key, node_id)
end
for _, key in ipairs({K.nodes, K.liveness, K.warmup, K.capacity_index, K.drains, K.lost, K.offline_since}) do
  redis.call('ZREM', key, node_id)
end
redis.call('DEL', K.node, K.queue, K.node_transitions, K.assigned, K.cancels)
return {'forgotten'}
