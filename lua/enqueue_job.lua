--#include job
-- enqueue_job: record a submitted job and put it in the waiting queue, once:
-- a submission delivered twice (Celery redelivers unacknowledged tasks)
-- creates nothing new.
--
-- KEYS: the job bundle
-- P: job_id, now_ms, queue_score (priority first, then submission time),
--    needs_class (the kind of needs, which J.waiting_class is the set of),
--    fields: job_type, payload (JSON text), required_models (JSON text),
--    require_gpu, public, timeout_seconds, timeout_ms, max_attempts,
--    dispatch_timeout_ms, priority, node_selector (JSON text), needs (JSON
--    text: the needs of the kind)
-- Returns: {"created", jobs waiting now (this one included)} | {"exists", state}

local state = redis.call('HGET', J.job, 'state')
if state then return {'exists', state} end
local f = P.fields
redis.call('HSET', J.job, 'job_id', P.job_id, 'job_type', f.job_type, 'payload', f.payload,
  'required_models', f.required_models, 'require_gpu', f.require_gpu and '1' or '0',
  'public', f.public and '1' or '0', 'timeout_seconds', f.timeout_seconds, 'timeout_ms', f.timeout_ms,
  'max_attempts', f.max_attempts, 'dispatch_timeout_ms', f.dispatch_timeout_ms, 'priority', f.priority,
  'node_selector', f.node_selector, 'state', 'waiting', 'attempt', 0, 'node_id', '', 'avoid', '[]',
  'queue_score', P.queue_score, 'submitted_ms', P.now_ms, 'waiting_since_ms', P.now_ms,
  'needs_class', P.needs_class, 'needs', f.needs)
wait_enter(P.job_id, P.queue_score, P.needs_class, f.needs)
redis.call('ZADD', J.deadlines, P.now_ms + f.dispatch_timeout_ms, P.job_id)
return {'created', redis.call('ZCARD', J.waiting)}
