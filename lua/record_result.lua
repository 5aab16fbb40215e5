--#include job
-- record_result: keep the node's result for the current attempt until the
-- completion script applies it. Accepted once; a result for another attempt
-- or from another node is stale and changes nothing.
--
-- KEYS: the job bundle
-- P: job_id, attempt, node_id, now_ms, meta (JSON text: success, error,
--    duration_ms), output (JSON text, exactly as the node sent it)
-- Returns: {"accepted"} | {"duplicate"} | {"stale", state}

local job = job_get('state', 'attempt', 'node_id', 'pending_attempt')
if (job.state ~= 'assigned' and job.state ~= 'running') or tonumber(job.attempt) ~= P.attempt
    or job.node_id ~= P.node_id then
  return {'stale', job.state or 'unknown'}
end
if job.pending_attempt == tostring(P.attempt) then return {'duplicate'} end
redis.call('HSET', J.job, 'pending_attempt', P.attempt, 'pending_meta', P.meta, 'pending_output', P.output,
  'result_received_ms', P.now_ms)
redis.call('ZADD', J.results, P.now_ms, P.job_id)
return {'accepted'}
