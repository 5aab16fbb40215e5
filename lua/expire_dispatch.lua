--#include job
-- expire_dispatch: a job that found no eligible node within its
-- dispatch_timeout_seconds fails, with the caller's explanation.
--
-- KEYS: the job bundle
-- P: job_id, needs_class, now_ms, message, exclusions (counts and examples by reason), retention_ms,
--    at_once (fail_fast: before the deadline)
-- Writes: J.job, J.waiting, J.waiting_class, J.waiting_classes, J.waiting_needs, J.deadlines,
--         J.result, J.finished_failed
-- Returns: {"failed", outcome JSON} | {"kept"}: not waiting, or not yet due

local job = job_get(LIFE_FIELDS)
local due = redis.call('ZSCORE', J.deadlines, P.job_id)
if job.state ~= JobState.WAITING or not due or (tonumber(due) > P.now_ms and not P.at_once) then return {'kept'} end
local outcome = finish(job, JobState.FAILED, {state = JobState.FAILED, code = FailureCode.NO_ELIGIBLE_NODE,
  message = P.message, exclusions = P.exclusions}, P.now_ms)
return {JobState.FAILED, cjson.encode(outcome)}
