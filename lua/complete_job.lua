--#include node job
-- complete_job: apply the result recorded for the current attempt: free the
-- node's slot, then finish the job, or send it back to wait for another node
-- when the node's error is retryable and attempts remain.
--
-- KEYS: the node bundle of the job's node, then the job bundle
-- P: job_id, node_id (as the caller read it), now_ms, retention_ms, wake_channel
-- Returns: {"succeeded"} | {"failed"} | {"retry"}
--          {"nothing"}: no result waiting (already applied)
--          {"stale"}: the result belongs to an attempt that is over
--          {"moved"}: the job's node is not P.node_id: read again

local job = job_get('state', 'attempt', 'node_id', 'max_attempts', 'pending_attempt', 'pending_meta',
  'pending_output')
if not job.pending_attempt then
  redis.call('ZREM', J.results, P.job_id)
  return {'nothing'}
end
if job.node_id ~= P.node_id then return {'moved'} end
forget_pending_result(P.job_id)
if (job.state ~= 'assigned' and job.state ~= 'running') or job.pending_attempt ~= job.attempt then
  return {'stale'}
end

local node_id, now = job.node_id, P.now_ms
local meta = cjson.decode(job.pending_meta)
release_slot(node_id, P.job_id, now)
if meta.success then
  redis.call('HSET', J.job, 'output', job.pending_output)
  finish(P.job_id, 'succeeded', {state = 'succeeded', node_id = node_id, attempt = tonumber(job.attempt),
    duration_ms = meta.duration_ms}, now)
  return {'succeeded'}
end
local err = meta.error
if err.retryable and tonumber(job.attempt) < tonumber(job.max_attempts) then
  back_to_waiting(P.job_id, node_id, 'failed: ' .. err.code, now)
  redis.call('HSET', J.job, 'last_error', cjson.encode(err))
  return {'retry'}
end
finish(P.job_id, 'failed', {state = 'failed', code = err.code, message = err.message, node_id = node_id,
  attempt = tonumber(job.attempt), max_attempts = tonumber(job.max_attempts), retryable = err.retryable}, now)
return {'failed'}
