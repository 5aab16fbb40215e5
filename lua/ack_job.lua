--#include job
-- ack_job: the node has the job and has started it (or reports progress,
-- which says as much). Fenced: only the node of the current attempt counts.
--
-- Celery's state becomes STARTED with info {node_id, attempt, progress?, message?}.
--
-- KEYS: the job bundle
-- P: job_id, attempt, node_id, now_ms, progress (or null), message (or null)
-- Writes: J.job, J.result
-- Returns: {"started", kind, worker}: first word from the node on this attempt
--          (worker: the Celery worker that took the submission, for the task event)
--          {"running", kind}: already started (a repeated ack, or progress)
--          {"stale", state}: not the current attempt or not this node
--          kind: the job's kind of needs (what its completion needs to requeue it)

local job = job_get({'state', 'attempt', 'node_id', 'needs_class', 'worker'})
if (job.state ~= JobState.ASSIGNED and job.state ~= JobState.RUNNING) or tonumber(job.attempt) ~= P.attempt
    or job.node_id ~= P.node_id then
  return {'stale', job.state or 'unknown'}
end
local info = {node_id = P.node_id, attempt = P.attempt}
if P.progress ~= cjson.null then
  redis.call('HSET', J.job, 'progress', P.progress, 'progress_message', P.message ~= cjson.null and P.message or '')
  info.progress = P.progress
  if P.message ~= cjson.null and P.message ~= '' then info.message = P.message end
elseif job.state == JobState.RUNNING then
  return {JobState.RUNNING, job.needs_class}  -- a repeated ack: nothing new to tell
end
if job.state == JobState.ASSIGNED then redis.call('HSET', J.job, 'state', JobState.RUNNING, 'acked_ms', P.now_ms) end
celery_state(CeleryState.STARTED, cjson.encode(info))
return {job.state == JobState.ASSIGNED and 'started' or JobState.RUNNING, job.needs_class, job.worker or ''}
