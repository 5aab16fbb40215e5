-- Prelude of the scripts that include both `job` and `node`: K is the bundle
-- of the node the job's current attempt runs on.

-- The job leaves its node: the slot is free again, its job_assign is forgotten, and a draining node with nothing
-- left goes offline. Returns whether a waiting job could take the freed slot
-- (by its static needs): only then is a pass over the waiting jobs worth it.
local function release_slot(node_id, now_ms)
  redis.call('HDEL', K.assigned, P.job_id)
  local n = redis.call('HMGET', K.node, 'max_concurrent_jobs', 'status', unpack(NODE_STATIC))
  local assigned = redis.call('HLEN', K.assigned)
  if n[2] == 'ready' then set_capacity(K.capacity_index, node_id, assigned, tonumber(n[1]) or 1, now_ms) end
  if n[2] == 'draining' and assigned == 0 then
    finish_drain(node_id, 'drained: its last job ended', now_ms)
  end
  return n[2] == 'ready' and waiting_could_take(n, 3, '+inf')
end

-- Tell the node to stop the job's attempt. A session's queued frames are
-- dropped when the node registers again, so the cancel is also remembered
-- for as long as the attempt may still run there (the job's timeout, counted
-- from now) and queued again should the node resume.
local function stop_on_node(node_id, job, reason, now_ms)
  local frame = cjson.encode({type = 'job_cancel', job_id = P.job_id, attempt = tonumber(job.attempt),
    reason = reason})
  deliver(node_id, frame)
  redis.call('ZREMRANGEBYSCORE', K.cancels, '-inf', now_ms)
  redis.call('ZADD', K.cancels, now_ms + tonumber(job.timeout_ms), frame)
  redis.call('PEXPIREAT', K.cancels, redis.call('ZRANGE', K.cancels, -1, -1, 'WITHSCORES')[2])
end
