--#include node job
-- cancel_job: cancel a waiting or running job. A node working on it is sent
-- job_cancel and its slot is freed at once.
--
-- KEYS: the node bundle of the job's node (any node's when it has none), then the job bundle
-- P: job_id, needs_class, node_id (as the caller read it, '' when none), now_ms, reason, retention_ms, wake_channel
-- Writes: J.job, J.waiting, J.waiting_class, J.waiting_classes, J.waiting_needs, J.deadlines,
--         J.result, J.finished_cancelled; K.node, K.liveness, K.warmup, K[status], K.queue,
--         K.node_transitions, K.transitions, K.capacity_index, K.assigned, K.cancels, K.drains,
--         K.offline_since
-- Returns: {"cancelled", node id or ""} | {"finished", state}: too late
--          {"unknown"} | {"moved"}: read again

local job = job_get(LIFE_FIELDS)
if not job.state then return {'unknown'} end
if TERMINAL[job.state] then return {'finished', job.state} end
if (job.node_id or '') ~= P.node_id then return {'moved'} end
local node_id = job.node_id or ''
if job.state == JobState.ASSIGNED or job.state == JobState.RUNNING then
  stop_on_node(node_id, job, P.reason, P.now_ms)
  release_slot(node_id, P.now_ms)
end
local outcome = finish(job, JobState.CANCELLED, {state = JobState.CANCELLED, reason = P.reason, node_id = node_id,
  attempt = tonumber(job.attempt)}, P.now_ms)
return {JobState.CANCELLED, node_id, cjson.encode(outcome)}
