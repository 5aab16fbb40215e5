--#include node job
-- complete_job: apply the node's result for its current attempt (a worker
-- calls it for each result it reads from the results stream): free the node's slot, then finish
-- the job, or send it back to wait for another node when the node's error is
-- retryable and attempts remain. Accepted once: a result for another attempt,
-- from another node, or for a job already over changes nothing.
--
-- KEYS: the node bundle of the sending node, then the job bundle
-- P: job_id, node_id, attempt, meta (JSON: success, error, duration_ms),
--    output (JSON text, exactly as the node sent it), now_ms, retention_ms,
--    needs_class (or null when the caller does not know it), wake_channel,
--    job_health (see note_job_outcome: an error with node_fault counts against the node)
-- Writes: J.job, J.waiting, J.waiting_class, J.waiting_classes, J.waiting_needs, J.deadlines,
--         J.result, J.finished_succeeded, J.finished_failed; K.node, K.liveness, K.warmup,
--         K[status], K.queue, K.node_transitions, K.transitions, K.capacity_index, K.assigned,
--         K.drains, K.offline_since
-- Returns: {"succeeded" | "failed", kick, outcome JSON, assigned_ms, degraded}
--          {"retry", kick, worker, degraded}: worker, the Celery worker that took the submission
--          kick "1": a waiting job could take the freed slot (a pass over them is due)
--          degraded: the JobFailures reason when this result degraded the node, else ""
--          {"stale", state}: not the current attempt of this node
--          {"need_kind"}: it would wait again, and needs_class was not given (nothing written)

local job = job_get(LIFE_FIELDS)
if (job.state ~= JobState.ASSIGNED and job.state ~= JobState.RUNNING) or tonumber(job.attempt) ~= P.attempt
    or job.node_id ~= P.node_id then
  return {'stale', job.state or 'unknown'}
end
local meta = cjson.decode(P.meta)
local err = meta.error
local retry = not meta.success and err.retryable and tonumber(job.attempt) < tonumber(job.max_attempts)
if retry and (P.needs_class == nil or P.needs_class == cjson.null) then return {'need_kind'} end

local node_id, now = job.node_id, P.now_ms
local freed, n = release_slot(node_id, now)
local degraded = note_job_outcome(node_id, n, (not meta.success and err.node_fault == true) and err.code or nil, now)
local kick = (freed and not degraded) and '1' or '0'
if meta.success then
  local outcome = {state = JobState.SUCCEEDED, node_id = node_id, attempt = tonumber(job.attempt),
    duration_ms = meta.duration_ms}
  finish(job, JobState.SUCCEEDED, outcome, now, {'output', P.output, 'result_received_ms', now}, P.output)
  return {JobState.SUCCEEDED, kick, cjson.encode(outcome), job.assigned_ms, degraded or ''}
end
if retry then
  back_to_waiting(job, 'failed: ' .. err.code, now, {'last_error', cjson.encode(err), 'result_received_ms', now})
  return {'retry', '1', job.worker or '', degraded or ''}
end
local outcome = {state = JobState.FAILED, code = err.code, message = err.message, node_id = node_id,
  attempt = tonumber(job.attempt), max_attempts = tonumber(job.max_attempts), retryable = err.retryable,
  node_fault = err.node_fault}
finish(job, JobState.FAILED, outcome, now, {'result_received_ms', now})
return {JobState.FAILED, kick, cjson.encode(outcome), job.assigned_ms, degraded or ''}
