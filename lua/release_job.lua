--#include node job
-- release_job: end the current attempt without a result: the node timed
-- out, was lost (offline past the grace), or its drain deadline passed. The
-- slot is freed, the node is told to stop when it may still be working, and
-- the job waits for another node, or fails when its attempts are used up.
--
-- KEYS: the node bundle of the job's node, then the job bundle
-- P: job_id, needs_class, node_id (as the caller read it), now_ms, code, message,
--    cancel_on_node, only_if_offline (node loss: not if it resumed),
--    only_if_due (timeout: not before the deadline), retention_ms, wake_channel,
--    job_health (see note_job_outcome; given for a timeout, which counts against the node)
-- Writes: J.job, J.waiting, J.waiting_class, J.waiting_classes, J.waiting_needs, J.deadlines,
--         J.result, J.finished_failed; K.node, K.liveness, K.warmup, K[status], K.queue,
--         K.node_transitions, K.transitions, K.capacity_index, K.assigned, K.cancels, K.drains,
--         K.offline_since
-- Returns: {"retry", worker, degraded} | {"failed", outcome JSON, degraded}
--          degraded: the JobFailures reason when this release degraded the node, else ""
--          {"kept"}: the condition no longer holds
--          {"gone"}: the job is not on a node any more | {"moved"}: read again

local job = job_get(LIFE_FIELDS)
if job.state ~= JobState.ASSIGNED and job.state ~= JobState.RUNNING then return {'gone'} end
if job.node_id ~= P.node_id then return {'moved'} end
if P.only_if_offline and redis.call('HGET', K.node, 'status') ~= NodeStatus.OFFLINE then return {'kept'} end
if P.only_if_due then
  local due = redis.call('ZSCORE', J.deadlines, P.job_id)
  if not due or tonumber(due) > P.now_ms then return {'kept'} end
end
local node_id, now = job.node_id, P.now_ms
if P.cancel_on_node then stop_on_node(node_id, job, P.message, now) end
local _, n = release_slot(node_id, now)
local degraded = note_job_outcome(node_id, n, P.code, now) or ''
if tonumber(job.attempt) < tonumber(job.max_attempts) then
  back_to_waiting(job, P.code, now, {'last_error', cjson.encode({code = P.code, message = P.message})})
  return {'retry', job.worker or '', degraded}
end
local outcome = finish(job, JobState.FAILED, {state = JobState.FAILED, code = P.code, message = P.message,
  node_id = node_id, attempt = tonumber(job.attempt), max_attempts = tonumber(job.max_attempts)}, now)
return {JobState.FAILED, cjson.encode(outcome), degraded}
