--#include node
-- drain_node: stop giving the node new jobs; it finishes what it has, then
-- goes offline (at once when it has nothing assigned).
--
-- KEYS: the node bundle
-- P: node_id, now_ms, requested_by, reason, deadline_ms (or null: no deadline),
--    wake_channel
-- Writes: K.node, K.liveness, K.warmup, K[status], K.queue, K.node_transitions, K.transitions,
--         K.capacity_index, K.drains, K.offline_since
-- Returns: {"draining", jobs left, previous status}
--          {"drained", 0, previous status}: nothing was assigned, offline now
--          {"refused", status}: only a ready or degraded node can be drained
--          {"unknown"}

local status = redis.call('HGET', K.node, 'status')
if status == false then return {'unknown'} end
if status ~= NodeStatus.READY and status ~= NodeStatus.DEGRADED then return {'refused', status} end
local jobs = redis.call('HLEN', K.assigned)
local deadline = P.deadline_ms ~= cjson.null and P.deadline_ms or ''
redis.call('HSET', K.node, 'drain_requested_ms', P.now_ms, 'drain_requested_by', P.requested_by,
  'drain_reason', P.reason, 'drain_deadline_ms', deadline, 'drain_jobs_at_start', jobs,
  'drain_ended_ms', '', 'drain_outcome', '', 'drain_pending', '1')
transition(P.node_id, NodeStatus.DRAINING, 'drain requested by ' .. P.requested_by .. ': ' .. P.reason, P.now_ms)
if jobs == 0 then
  finish_drain(P.node_id, 'drained: no jobs were assigned', P.now_ms)
  return {'drained', 0, status}
end
redis.call('ZADD', K.drains, deadline ~= '' and deadline or '+inf', P.node_id)
return {NodeStatus.DRAINING, jobs, status}
