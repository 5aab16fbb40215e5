-- Prelude of the scripts that include `job`: the job bundle J, and when the
-- script also includes `node`, the bundle K of the node running the job.
--
-- A job is `waiting`, `assigned` (queued for its node), `running` (the node
-- acknowledged it), or finished: `succeeded`, `failed`, `cancelled`.

local TERMINAL = {succeeded = true, failed = true, cancelled = true}

local function job_get(...)
  local values = redis.call('HMGET', J.job, ...)
  local job = {}
  for i, name in ipairs({...}) do
    job[name] = values[i] ~= false and values[i] or nil
  end
  return job
end

-- Close the newest entry of the job's attempt history.
local function end_attempt(outcome, now_ms)
  local last = redis.call('LINDEX', J.job_attempts, -1)
  if last then
    local entry = cjson.decode(last)
    if entry.ended_ms == nil then
      entry.ended_ms, entry.outcome = now_ms, outcome
      redis.call('LSET', J.job_attempts, -1, cjson.encode(entry))
    end
  end
end

-- The job ends for good. Its Celery result is published next (the `publish`
-- index remembers it until the publisher confirms, so no crash loses it).
local function finish(job_id, state, outcome, now_ms)
  redis.call('HSET', J.job, 'state', state, 'finished_ms', now_ms, 'outcome', cjson.encode(outcome))
  redis.call('ZREM', J.waiting, job_id)
  redis.call('ZREM', J.deadlines, job_id)
  redis.call('ZADD', J.publish, now_ms, job_id)
  end_attempt(state, now_ms)
  local retention_s = math.floor(P.retention_ms / 1000)
  redis.call('EXPIRE', J.job, retention_s)
  redis.call('EXPIRE', J.job_attempts, retention_s)
end

-- The job waits for a node again, keeping its place (priority, then first
-- submission); the node it just left is avoided when another one can take it.
local function back_to_waiting(job_id, left_node, outcome, now_ms)
  local job = job_get('avoid', 'queue_score', 'dispatch_timeout_ms')
  local avoid = cjson.decode(job.avoid or '[]')
  if left_node and left_node ~= '' then table.insert(avoid, left_node) end
  redis.call('HSET', J.job, 'state', 'waiting', 'node_id', '', 'waiting_since_ms', now_ms,
    'avoid', cjson.encode(avoid), 'progress', '', 'progress_message', '')
  redis.call('ZADD', J.waiting, job.queue_score, job_id)
  redis.call('ZADD', J.deadlines, now_ms + tonumber(job.dispatch_timeout_ms), job_id)
  end_attempt(outcome, now_ms)
end

-- A node's result recorded for completion no longer applies (or was just applied).
local function forget_pending_result(job_id)
  redis.call('HDEL', J.job, 'pending_attempt', 'pending_meta', 'pending_output')
  redis.call('ZREM', J.results, job_id)
end
