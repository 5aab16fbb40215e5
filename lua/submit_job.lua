--#include job
-- submit_job: record a submitted job and give it to the first candidate that
-- passes the filter, in one atomic step, unless a job waiting ahead of it
-- could take that node; else it waits. A submission delivered twice (Celery redelivers unacknowledged
-- tasks) creates nothing new.
--
-- KEYS: the job bundle, then the index sets a candidate must be in (see _job.lua).
-- P: job_id, needs_class, now_ms, queue_score (priority first, then
--    submission time), wanted, budget, node_key, heartbeat_timeout_ms,
--    resource_threshold, examples (as dispatch_job's),
--    fields: job_type, payload (JSON text), required_models (JSON text),
--    require_gpu, public, timeout_seconds, timeout_ms, max_attempts,
--    dispatch_timeout_ms, priority, node_selector (JSON text), needs (JSON
--    text of the kind's needs), worker (the Celery worker's hostname, for task events)
-- Writes: J.job, J.waiting, J.waiting_class, J.waiting_classes, J.waiting_needs, J.deadlines,
--         J.capacity_index; and the chosen node's assigned jobs and queue (named from P.node_key)
-- Returns: {"assigned", node id, attempt, exclusions JSON}
--          {"waiting", exclusions JSON}: no candidate fits; the job waits
--          {"queued"}: a job waiting ahead of it could take the node: it waits behind it
--          {"exists", state}
--          {"revoked"}: revoked through Celery before it arrived (nothing written)

local state = job_get({'state'}).state
if state then return {'exists', state} end
-- Celery marks a task it was told to revoke before any worker had it: that final state stands.
local prior = redis.call('GET', J.result)
if prior and cjson.decode(prior).status == CeleryState.REVOKED then return {'revoked'} end
local f, now = P.fields, P.now_ms
local job = {job_type = f.job_type, payload = f.payload, required_models = f.required_models,
  require_gpu = f.require_gpu and '1' or '0', public = f.public and '1' or '0',
  timeout_seconds = f.timeout_seconds, timeout_ms = f.timeout_ms, node_selector = f.node_selector}

local function record(...)
  redis.call('HSET', J.job, 'job_id', P.job_id, 'job_type', f.job_type, 'payload', f.payload,
    'required_models', f.required_models, 'require_gpu', job.require_gpu, 'public', job.public,
    'timeout_seconds', f.timeout_seconds, 'timeout_ms', f.timeout_ms, 'max_attempts', f.max_attempts,
    'dispatch_timeout_ms', f.dispatch_timeout_ms, 'priority', f.priority, 'node_selector', f.node_selector,
    'needs_class', P.needs_class, 'needs', f.needs, 'queue_score', P.queue_score, 'submitted_ms', now,
    'waiting_since_ms', now, 'avoid', '[]', 'worker', f.worker or '', ...)
end

local function wait()
  record('state', JobState.WAITING, 'attempt', 0, 'node_id', '')
  wait_enter(P.job_id, P.queue_score, P.needs_class, f.needs)
  redis.call('ZADD', J.deadlines, now + f.dispatch_timeout_ms, P.job_id)
end

local pick, exclusions = pick_node(needs_of_record(job), {})
-- Older or more urgent jobs go first: when one waiting could take this node, this job
-- waits behind it, and a pass over the waiting jobs places them in order.
if pick and waiting_could_take(pick.n, 7, P.queue_score) then
  wait()
  return {'queued'}
end
if pick then
  local attempt = assign(job, pick, now)
  record('state', JobState.ASSIGNED, 'attempt', attempt, 'node_id', pick.node_id, 'assigned_ms', now,
    'last_decision', cjson.encode({outcome = JobState.ASSIGNED, node_id = pick.node_id, at_ms = now,
      examined = pick.index, counts = exclusions.counts, examples = exclusions.examples}))
  return {JobState.ASSIGNED, pick.node_id, attempt, cjson.encode(exclusions)}
end
wait()
return {JobState.WAITING, cjson.encode(exclusions)}
