--#include job
-- expire_dispatch: a job that found no eligible node within its
-- dispatch_timeout_seconds fails, with the caller's explanation.
--
-- KEYS: the job bundle
-- P: job_id, now_ms, message, exclusions (counts and examples by reason), retention_ms
-- Returns: {"failed"} | {"kept"}: not waiting, or not yet due

local state = redis.call('HGET', J.job, 'state')
local due = redis.call('ZSCORE', J.deadlines, P.job_id)
if state ~= 'waiting' or not due or tonumber(due) > P.now_ms then return {'kept'} end
finish(P.job_id, 'failed', {state = 'failed', code = 'NO_ELIGIBLE_NODE', message = P.message,
  exclusions = P.exclusions}, P.now_ms)
return {'failed'}
