--#include node
-- register_node: create a node, or resume a known one whose secret matches,
-- and bind it to a new session. A resumed node starts over in `registering`
-- with a fresh health history and keeps its assigned jobs, whose job_assign
-- frames are queued again (the node drops the ones it already has), after
-- the job_cancel frames it may have missed.
--
-- KEYS: the node bundle, then one model index key per P.index_models entry,
--       then one label index key per P.index_labels entry.
-- P: node_id, secret_hash, session_id, web_id, now_ms, wake_channel,
--    expected_models / expected_labels (the stored JSON the caller read, or
--    null when it saw no node), fields (version, capability_schema_version,
--    advanced_features, hardware, gpu_count, gpu_available, models, labels,
--    accept_public, max_concurrent_jobs: JSON texts and scalars),
--    ready_models (list), labels_flat (list of "key=value"),
--    index_models (list), index_labels (list of "key=value")
-- Writes: K.node, K.nodes, K.liveness, K.warmup, K[status], K.queue, K.node_transitions,
--         K.transitions, K.gpu_index, K.public_index, K.resources_index, K.capacity_index,
--         K.cancels, K.drains, K.lost, K.offline_since; and the model and label index sets after
--         the bundle
-- Returns: {"created", status} | {"resumed", status, old session id}
--          {"conflict"}: the node exists and the secret does not match
--          {"retry"}: the stored node changed since the caller read it

local node_id, now, f = P.node_id, P.now_ms, P.fields
local stored = redis.call('HMGET', K.node, 'secret_hash', 'models', 'labels', 'session_id', 'status',
  'drain_outcome')
local exists = stored[1] ~= false
if exists and stored[1] ~= P.secret_hash then return {'conflict'} end
if (stored[2] or cjson.null) ~= P.expected_models or (stored[3] or cjson.null) ~= P.expected_labels then
  return {'retry'}
end

local function set_member(key, member, present)
  if present then redis.call('SADD', key, member) else redis.call('SREM', key, member) end
end

local ready, labels = {}, {}
for _, model_id in ipairs(P.ready_models) do ready[model_id] = true end
for _, label in ipairs(P.labels_flat) do labels[label] = true end
for i, model_id in ipairs(P.index_models) do set_member(KEYS[NEXT + i - 1], node_id, ready[model_id]) end
local first_label = NEXT + #P.index_models
for i, label in ipairs(P.index_labels) do set_member(KEYS[first_label + i - 1], node_id, labels[label]) end

redis.call('HSET', K.node,
  'node_id', node_id, 'secret_hash', P.secret_hash,
  'session_id', P.session_id, 'web_id', P.web_id, 'connected', '1', 'session_started_ms', now,
  'version', f.version, 'capability_schema_version', f.capability_schema_version,
  'advanced_features', f.advanced_features, 'hardware', f.hardware, 'gpu_count', f.gpu_count,
  'gpu_available', f.gpu_available and '1' or '0', 'models', f.models, 'labels', f.labels,
  'accept_public', f.accept_public and '1' or '0', 'max_concurrent_jobs', f.max_concurrent_jobs,
  'last_seen_ms', now, 'last_healthy', '', 'last_health_reason', 'no heartbeat yet')
if not exists then redis.call('HSET', K.node, 'registered_at_ms', now) end
-- A drained node that registers again is back in service.
if stored[6] == 'drained' then redis.call('HSET', K.node, 'drain_outcome', 'ended: registered again') end
redis.call('ZADD', K.nodes, 0, node_id)
redis.call('ZADD', K.liveness, now, node_id)
redis.call('ZREM', K.lost, node_id)
set_member(K.public_index, node_id, f.accept_public)
set_member(K.gpu_index, node_id, f.gpu_available)
-- Usage is unknown until the first heartbeat: keep the node out of the resources index.
redis.call('SREM', K.resources_index, node_id)

-- Frames queued for an older session are stale; the assignments and the
-- cancels of attempts that may still run there are not.
redis.call('DEL', K.queue)
transition(node_id, NodeStatus.REGISTERING, exists and 'resumed' or 'registered', now)
redis.call('ZREMRANGEBYSCORE', K.cancels, '-inf', now)
for _, frame in ipairs(redis.call('ZRANGE', K.cancels, 0, -1)) do
  redis.call('RPUSH', K.queue, frame)
end
for _, frame in ipairs(redis.call('HVALS', K.assigned)) do
  redis.call('RPUSH', K.queue, frame)
end

-- An older session, wherever it is, finds on its next pop that it no longer
-- holds the node (the wake above reaches it) and closes.
if not exists then return {'created', NodeStatus.REGISTERING} end
return {'resumed', NodeStatus.REGISTERING, stored[4] or ''}
