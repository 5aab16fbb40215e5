-- Prelude of the scripts that include both `job` and `node`: K is the bundle
-- of the node the job's current attempt runs on.

-- The job leaves its node: the slot is free again (dispatchers are told by
-- the epoch), its job_assign is forgotten, and a draining node with nothing
-- left goes offline.
local function release_slot(node_id, job_id, now_ms)
  redis.call('HDEL', K.assigned, job_id)
  refresh_capacity(node_id)
  redis.call('INCR', K.epoch)
  if redis.call('HGET', K.node, 'status') == 'draining' and redis.call('HLEN', K.assigned) == 0 then
    finish_drain(node_id, 'drained: its last job ended', now_ms)
  end
end

-- Tell the node to stop the job's attempt. A session's queued frames are
-- dropped when the node registers again, so the cancel is also remembered
-- for as long as the attempt may still run there (the job's timeout, counted
-- from now) and queued again should the node resume.
local function stop_on_node(node_id, job_id, attempt, reason, now_ms)
  local frame = cjson.encode({type = 'job_cancel', job_id = job_id, attempt = tonumber(attempt), reason = reason})
  deliver(node_id, frame)
  redis.call('ZREMRANGEBYSCORE', K.cancels, '-inf', now_ms)
  redis.call('ZADD', K.cancels, now_ms + tonumber(redis.call('HGET', J.job, 'timeout_ms')), frame)
  redis.call('PEXPIREAT', K.cancels, redis.call('ZRANGE', K.cancels, -1, -1, 'WITHSCORES')[2])
end
