-- Prelude of the scripts that include `job`: the job bundle J, and when the
-- script also includes `node`, the bundle K of the node running the job.
--
-- A job is `waiting`, `assigned` (queued for its node), `running` (the node
-- acknowledged it), or finished: `succeeded`, `failed`, `cancelled`.
--
-- A waiting job is in J.waiting (all of them, in order) and in the sorted set
-- of its kind of needs, J.waiting_class (P.needs_class names the kind); the
-- kinds are ranked by their first job in J.waiting_classes. A pass over the
-- waiting jobs then tries each kind once, whatever the number of jobs.

local TERMINAL = {succeeded = true, failed = true, cancelled = true}

-- Refuse, before anything is written, a job id that could name another key, and
-- keys built for another kind of needs than the job's (J.waiting_class).
if type(P.job_id) ~= 'string' or #P.job_id > 128 or not P.job_id:match('^[%w_.-]+$') then
  return redis.error_reply('invalid job id')
end
if P.needs_class ~= nil and P.needs_class ~= cjson.null then
  local stored_class = redis.call('HGET', J.job, 'needs_class')
  if stored_class and stored_class ~= P.needs_class then
    return redis.error_reply('job ' .. P.job_id .. ' is of kind ' .. stored_class .. ', not ' .. P.needs_class)
  end
end

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

-- J.waiting_class is the set of the kind the caller passed as P.needs_class.
local function check_class(needs_class)
  if not needs_class or needs_class ~= P.needs_class then
    error('job of kind ' .. tostring(needs_class) .. ' but keys built for ' .. tostring(P.needs_class))
  end
end

local function wait_enter(job_id, score, needs_class, needs)
  check_class(needs_class)
  redis.call('ZADD', J.waiting, score, job_id)
  redis.call('ZADD', J.waiting_class, score, job_id)
  redis.call('ZADD', J.waiting_classes, 'LT', score, needs_class)
  redis.call('HSETNX', J.waiting_needs, needs_class, needs)
end

local function wait_leave(job_id, needs_class)
  check_class(needs_class)
  if redis.call('ZREM', J.waiting, job_id) == 0 then return end
  redis.call('ZREM', J.waiting_class, job_id)
  local head = redis.call('ZRANGE', J.waiting_class, 0, 0, 'WITHSCORES')
  if head[1] then
    redis.call('ZADD', J.waiting_classes, head[2], needs_class)
  else
    redis.call('ZREM', J.waiting_classes, needs_class)
    redis.call('HDEL', J.waiting_needs, needs_class)
  end
end

-- The job ends for good. Its Celery result is published next (the `publish`
-- index remembers it until the publisher confirms, so no crash loses it).
local function finish(job_id, state, outcome, now_ms)
  wait_leave(job_id, redis.call('HGET', J.job, 'needs_class'))
  redis.call('HSET', J.job, 'state', state, 'finished_ms', now_ms, 'outcome', cjson.encode(outcome))
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
  local job = job_get('avoid', 'queue_score', 'dispatch_timeout_ms', 'needs_class', 'needs')
  check_class(job.needs_class)
  local avoid = cjson.decode(job.avoid or '[]')
  if left_node and left_node ~= '' then table.insert(avoid, left_node) end
  redis.call('HSET', J.job, 'state', 'waiting', 'node_id', '', 'waiting_since_ms', now_ms,
    'avoid', cjson.encode(avoid), 'progress', '', 'progress_message', '')
  wait_enter(job_id, job.queue_score, job.needs_class, job.needs)
  redis.call('ZADD', J.deadlines, now_ms + tonumber(job.dispatch_timeout_ms), job_id)
  end_attempt(outcome, now_ms)
end

-- A node's result recorded for completion no longer applies (or was just applied).
local function forget_pending_result(job_id)
  redis.call('HDEL', J.job, 'pending_attempt', 'pending_meta', 'pending_output')
  redis.call('ZREM', J.results, job_id)
end
