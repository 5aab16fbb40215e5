--#include job
-- dispatch_job: give a waiting job to the first candidate that passes the
-- filter (the node it just left only when no other fits), atomically: the
-- slot is reserved, the job recorded as assigned and its job_assign queued
-- together, or nothing changes.
--
-- KEYS: the job bundle, then the index sets a candidate must be in (see _job.lua).
-- P: job_id, needs_class, now_ms, wanted (candidates looked at), budget (nodes
--    read in load order before the sets are intersected), node_key,
--    heartbeat_timeout_ms, resource_threshold, examples (ids kept per reason),
--    wake_channel
-- Writes: J.job, J.waiting, J.waiting_class, J.waiting_classes, J.waiting_needs, J.deadlines,
--         J.capacity_index; and the chosen node's assigned jobs and queue (named from P.node_key)
-- Returns: {"assigned", node id, attempt, exclusions JSON, ms waited since the job (last) began waiting}
--          {"waiting", exclusions JSON}: no candidate fits
--          {"not_waiting", state}

local job = job_get({'state', 'attempt', 'job_type', 'payload', 'required_models', 'require_gpu', 'public',
  'timeout_seconds', 'timeout_ms', 'node_selector', 'avoid', 'waiting_since_ms', 'needs_class'})
if job.state ~= JobState.WAITING then return {'not_waiting', job.state or 'unknown'} end
local avoid = {}
for _, node_id in ipairs(cjson.decode(job.avoid or '[]')) do avoid[node_id] = true end

local pick, exclusions = pick_node(needs_of_record(job), avoid)
if not pick then return {JobState.WAITING, cjson.encode(exclusions)} end
local now = P.now_ms
local attempt = assign(job, pick, now)
wait_leave(P.job_id, job.needs_class)
redis.call('HSET', J.job, 'state', JobState.ASSIGNED, 'attempt', attempt, 'node_id', pick.node_id, 'assigned_ms', now,
  'acked_ms', '', 'progress', '', 'progress_message', '',
  'last_decision', cjson.encode({outcome = JobState.ASSIGNED, node_id = pick.node_id, at_ms = now,
    examined = pick.index, counts = exclusions.counts, examples = exclusions.examples}))
return {JobState.ASSIGNED, pick.node_id, attempt, cjson.encode(exclusions), now - tonumber(job.waiting_since_ms)}
