--#include job
-- ack_job: the node has the job and has started it (or reports progress,
-- which says as much). Fenced: only the node of the current attempt counts.
--
-- KEYS: the job bundle
-- P: job_id, attempt, node_id, now_ms, progress (or null), message (or null)
-- Returns: {"started"}: first word from the node on this attempt
--          {"running"}: already started (a repeated ack, or progress)
--          {"stale", state}: not the current attempt or not this node

local job = job_get('state', 'attempt', 'node_id')
if (job.state ~= 'assigned' and job.state ~= 'running') or tonumber(job.attempt) ~= P.attempt
    or job.node_id ~= P.node_id then
  return {'stale', job.state or 'unknown'}
end
if P.progress ~= cjson.null then
  redis.call('HSET', J.job, 'progress', P.progress, 'progress_message', P.message ~= cjson.null and P.message or '')
end
if job.state == 'running' then return {'running'} end
redis.call('HSET', J.job, 'state', 'running', 'acked_ms', P.now_ms)
local last = redis.call('LINDEX', J.job_attempts, -1)
if last then
  local entry = cjson.decode(last)
  entry.acked_ms = P.now_ms
  redis.call('LSET', J.job_attempts, -1, cjson.encode(entry))
end
return {'started'}
