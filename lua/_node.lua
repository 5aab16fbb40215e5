-- Prelude of the scripts that include `node`: the status machine's one
-- transition function and what goes with it, on the node bundle K. (The
-- leading underscore keeps preludes out of the script list.)

-- Refuse, before anything is written, a node id that could name another key
-- ('' for a job script whose job is on no node).
if type(P.node_id) ~= 'string' or #P.node_id > 64 or not P.node_id:match('^[%w_.-]*$') then
  return redis.error_reply('invalid node id')
end

local function status_key(status)
  return K[status]
end

local function deliver(node_id, frame)
  deliver_to(K.queue, node_id, frame)
end

local function status_frame(node_id, status, previous, reason, now_ms)
  return cjson.encode({
    type = 'node_status', node_id = node_id, status = status,
    previous_status = previous or cjson.null, reason = reason, timestamp = now_ms, periodic = false,
  })
end

-- Only for a ready node: the capacity index holds ready nodes with a free slot.
local function refresh_capacity(node_id, now_ms)
  return refresh_capacity_of(K.node, K.assigned, K.capacity_index, node_id, now_ms)
end

-- Move the node to a new status. This is the only place a status changes:
-- status sets, warmup and liveness indexes, the health window (fresh for every
-- status), the transition logs and the node_status frame all change together.
-- ``extra``: more node fields to write with the status (a flat list of names and values).
local function transition(node_id, to, reason, now_ms, extra)
  local from = redis.call('HGET', K.node, 'status')
  if from == false then from = nil end
  for _, status in ipairs(NODE_STATUSES) do
    if status ~= to then redis.call('SREM', status_key(status), node_id) end
  end
  redis.call('SADD', status_key(to), node_id)
  redis.call('HSET', K.node,
    'status', to, 'previous_status', from or '', 'status_reason', reason,
    'status_since_ms', now_ms, 'window', '', 'consecutive_ok', 0, 'consecutive_fail', 0, unpack(extra or {}))
  if to == NodeStatus.REGISTERING then
    redis.call('ZADD', K.warmup, now_ms, node_id)
  else
    redis.call('ZREM', K.warmup, node_id)
  end
  if to == NodeStatus.OFFLINE then
    -- (whoever takes a node offline writes why in ``extra``, field offline_cause: see go_offline)
    redis.call('ZREM', K.liveness, node_id)
    redis.call('ZREM', K.drains, node_id)
    redis.call('ZADD', K.offline_since, now_ms, node_id)
  else
    redis.call('ZREM', K.offline_since, node_id)
    if from == NodeStatus.OFFLINE then redis.call('HDEL', K.node, 'offline_cause') end
  end
  if to == NodeStatus.READY then
    -- A node that turns ready may take waiting jobs: into the capacity index (which holds
    -- ready nodes only).
    refresh_capacity(node_id, now_ms)
  else
    redis.call('ZREM', K.capacity_index, node_id)
  end
  local entry = {from = from or cjson.null, to = to, reason = reason, at_ms = now_ms}
  redis.call('LPUSH', K.node_transitions, cjson.encode(entry))
  redis.call('LTRIM', K.node_transitions, 0, 49)
  entry.node_id = node_id
  redis.call('LPUSH', K.transitions, cjson.encode(entry))
  redis.call('LTRIM', K.transitions, 0, 499)
  deliver(node_id, status_frame(node_id, to, from, reason, now_ms))
  return from
end

-- Whether the node still cools down after a JobFailures degradation (``until_ms``: its
-- job_cooldown_until_ms field as HMGET read it): it does not return to ready before then.
local function cooling_down(until_ms, now_ms)
  return now_ms < (tonumber(until_ms or '') or 0)
end

-- Offline: the node's assigned jobs wait ``grace_ms`` (the caller's setting) for it to
-- resume, then they are dispatched elsewhere. Every way offline records why for code in
-- field offline_cause, a FailureCode: what the jobs taken back from the node fail or retry
-- with (dispatcher/recovery.py); status_reason says it for people. Deleted when the node
-- leaves offline.
local function go_offline(node_id, reason, now_ms, grace_ms)
  transition(node_id, NodeStatus.OFFLINE, reason, now_ms, {'offline_cause', FailureCode.NODE_LOST})
  if redis.call('HLEN', K.assigned) > 0 then
    redis.call('ZADD', K.lost, now_ms + grace_ms, node_id)
  end
end

-- A drain is over: the node goes offline and keeps its session, so that it
-- stays out of service until an undrain (or until it registers again). ``cause``: its
-- offline_cause, FailureCode.DRAIN_DEADLINE when the deadline passed with jobs left
-- (default NODE_LOST, as go_offline's: a drain that ended on its own leaves no job).
local function finish_drain(node_id, reason, now_ms, cause)
  redis.call('HSET', K.node, 'drain_ended_ms', now_ms, 'drain_outcome', 'drained', 'drain_pending', '0')
  transition(node_id, NodeStatus.OFFLINE, reason, now_ms, {'offline_cause', cause or FailureCode.NODE_LOST})
end

-- A drain outlives the node's session: a node that drops out while draining
-- and comes back is put back to draining as soon as it is ready or degraded
-- again (with its deadline), instead of taking new jobs.
local function resume_pending_drain(node_id, now_ms)
  local d = redis.call('HMGET', K.node, 'drain_pending', 'drain_requested_by', 'drain_reason', 'drain_deadline_ms')
  if d[1] ~= '1' then return false end
  transition(node_id, NodeStatus.DRAINING, 'drain requested by ' .. d[2] .. ': ' .. d[3] .. ' (resumed)', now_ms)
  if redis.call('HLEN', K.assigned) == 0 then
    finish_drain(node_id, 'drained: no jobs were assigned', now_ms)
  else
    redis.call('ZADD', K.drains, (d[4] and d[4] ~= '') and d[4] or '+inf', node_id)
  end
  return true
end

-- Ask the session holding the node to close, after the frames queued before
-- this one. Frames starting with "!" are for the web process, never the node.
local function end_session(node_id, close_code, reason)
  deliver(node_id, '!close ' .. close_code .. ' ' .. reason)
end
