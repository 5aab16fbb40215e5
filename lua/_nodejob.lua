-- Prelude of the scripts that include both `job` and `node`: K is the bundle
-- of the node the job's current attempt runs on.

-- The job leaves its node: the slot is free again, its job_assign is forgotten, and a draining node with nothing
-- left goes offline. Returns whether a waiting job could take the freed slot
-- (by its static needs): only then is a pass over the waiting jobs worth it; and
-- the node's fields as read (for note_job_outcome).
local function release_slot(node_id, now_ms)
  redis.call('HDEL', K.assigned, P.job_id)
  local n = redis.call('HMGET', K.node, 'max_concurrent_jobs', 'status', 'job_window', unpack(NODE_STATIC))
  local assigned = redis.call('HLEN', K.assigned)
  -- A cordoned node's freed slot takes no new job: it stays out of the capacity index.
  local open = n[2] == NodeStatus.READY and not is_cordoned(n, 4)
  if open then set_capacity(K.capacity_index, node_id, assigned, tonumber(n[1]) or 1, now_ms) end
  if n[2] == NodeStatus.DRAINING and assigned == 0 then
    finish_drain(node_id, 'drained: its last job ended', now_ms)
  end
  return open and waiting_could_take(n, 4, '+inf'), n
end

-- Count the attempt's outcome in the node's job window (field job_window: its last
-- P.job_health.window outcomes, oldest first, "1" good, "0" the node's own failure; the
-- trailing "0"s are its failures in a row). ``n``: release_slot's read of the node;
-- ``code``: the failure's error code, nil for a good outcome. Without P.job_health the
-- attempt says nothing of the node and nothing is counted. A ready node with
-- P.job_health.consecutive failures in a row, or P.job_health.in_window in its window, is
-- degraded for JobFailures: its window starts afresh and it cools down for
-- P.job_health.cooldown_ms (record_heartbeat keeps it out of ready until then). Returns
-- the transition's reason when it degraded the node. Costs one HSET; none when nothing
-- changed (a healthy node's full window of successes).
local function note_job_outcome(node_id, n, code, now_ms)
  local h = P.job_health
  if h == nil or h == cjson.null then return nil end
  local old_window = n[3] or ''
  local window = (old_window .. (code and '0' or '1')):sub(-h.window)
  if not code then
    if window ~= old_window then redis.call('HSET', K.node, 'job_window', window) end
    return nil
  end
  local last_failure = cjson.encode({code = code, job_id = P.job_id, at_ms = now_ms})
  local run = #window:match('0*$')
  local _, failures = window:gsub('0', '')
  local why = nil  -- (only a ready node is degraded: the others take no new job anyway)
  if n[2] == NodeStatus.READY and run >= h.consecutive then
    why = run .. ' of the last ' .. run
  elseif n[2] == NodeStatus.READY and failures >= h.in_window then
    why = failures .. ' of the last ' .. #window
  end
  if not why then
    redis.call('HSET', K.node, 'job_window', window, 'job_last_failure', last_failure)
    return nil
  end
  local reason = 'JobFailures: ' .. why .. ' jobs failed (' .. code .. ')'
  transition(node_id, NodeStatus.DEGRADED, reason, now_ms, {'job_window', '', 'job_last_failure', last_failure,
    'job_cooldown_until_ms', now_ms + h.cooldown_ms})
  return reason
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
