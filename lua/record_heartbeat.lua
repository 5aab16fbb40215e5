--#include node
-- record_heartbeat: store one heartbeat, its health verdict and any status
-- transition it causes, atomically.
--
-- KEYS: the node bundle, then one model index key per P.index_models entry
--       (every model the node had or now has).
-- P: node_id, session_id, now_ms, wake_channel,
--    healthy (bool), health_reason, cpu, gpu (or null), mem, running_jobs,
--    gpu_available (bool), models (JSON text of the model list, or null when
--    the heartbeat did not list models), index_models (list),
--    resource_threshold, success_threshold, window_size, failure_rate_threshold,
--    consecutive_failure_threshold, warmup_ms, mismatch_heartbeats
-- Writes: K.node, K.liveness, K.warmup, K[status], K.queue, K.node_transitions, K.transitions,
--         K.gpu_index, K.resources_index, K.capacity_index, K.drains, K.offline_since; and the
--         model index sets after the bundle
-- Returns: {"ok", status, transitioned "1"/"0", previous_status, reason, kick "1"/"0",
--           mismatch, assigned}
--          kick: the node may take more work now and jobs are waiting
--          mismatch: "began" when running_jobs has differed from the node's assigned jobs
--          for P.mismatch_heartbeats heartbeats in a row (once per episode), "ended" when
--          they agree again after that, else ""; assigned: the node's assigned jobs
--          {"unknown"} | {"superseded"} | {"offline"}
--          {"retry", stored models JSON}: index_models missed a stored model.

local node_id, now = P.node_id, P.now_ms
local fields = redis.call('HMGET', K.node, 'status', 'session_id', 'models', 'status_since_ms',
  'consecutive_ok', 'consecutive_fail', 'window', 'gpu_count', 'drain_outcome', 'job_cooldown_until_ms',
  'running_mismatch')
local status, session_id, stored_models = fields[1], fields[2], fields[3]
if status == false then return {'unknown'} end
if session_id ~= P.session_id then return {'superseded'} end
if status == NodeStatus.OFFLINE then
  -- A drained node keeps its session, idle, until an undrain closes it.
  if fields[9] ~= 'drained' then return {NodeStatus.OFFLINE} end
  redis.call('HSET', K.node, 'last_seen_ms', now, 'last_heartbeat_ms', now)
  return {'ok', status, '0', status, '', '0'}
end

-- Whether this heartbeat may let the node take work it could not before.
local more_work = false

-- Model indexes: only when the heartbeat lists models and they changed.
if P.models ~= cjson.null and P.models ~= stored_models then
  local passed = {}
  for _, model_id in ipairs(P.index_models) do passed[model_id] = true end
  for _, model in ipairs(cjson.decode(stored_models)) do
    if not passed[model.model_id] then return {'retry', stored_models} end
  end
  local ready = {}
  for _, model in ipairs(cjson.decode(P.models)) do
    if model.status == ModelState.READY then ready[model.model_id] = true end
  end
  for i, model_id in ipairs(P.index_models) do
    if ready[model_id] then
      redis.call('SADD', KEYS[NEXT + i - 1], node_id)
    else
      redis.call('SREM', KEYS[NEXT + i - 1], node_id)
    end
  end
  redis.call('HSET', K.node, 'models', P.models)
  more_work = true
end

local gpu_ok = P.gpu_available and tonumber(fields[8] or '0') > 0
local busiest = math.max(P.cpu, P.mem, P.gpu ~= cjson.null and P.gpu or 0)
redis.call('HSET', K.node,
  'last_seen_ms', now, 'last_heartbeat_ms', now,
  'cpu_percent', tostring(P.cpu), 'mem_percent', tostring(P.mem),
  'gpu_percent', P.gpu ~= cjson.null and tostring(P.gpu) or '',
  'running_jobs', P.running_jobs, 'gpu_available', gpu_ok and '1' or '0',
  'last_healthy', P.healthy and '1' or '0', 'last_health_reason', P.health_reason)
redis.call('ZADD', K.liveness, now, node_id)
if gpu_ok then
  if redis.call('SADD', K.gpu_index, node_id) == 1 then more_work = true end
else
  redis.call('SREM', K.gpu_index, node_id)
end
if busiest < P.resource_threshold then
  if redis.call('SADD', K.resources_index, node_id) == 1 then more_work = true end
else
  redis.call('SREM', K.resources_index, node_id)
end

-- Health window of the current status: consecutive counts and the last N results.
local ok_run = tonumber(fields[5] or '0') or 0
local fail_run = tonumber(fields[6] or '0') or 0
if P.healthy then ok_run, fail_run = ok_run + 1, 0 else ok_run, fail_run = 0, fail_run + 1 end
local window = ((fields[7] or '') .. (P.healthy and '1' or '0')):sub(-P.window_size)

-- The node's own count of its jobs against our record of them: an episode of
-- disagreement begins after P.mismatch_heartbeats heartbeats in a row (an assignment in
-- flight, or a result on its way, explains one or two) and ends when they agree again.
-- Field running_mismatch: "" (or absent) when they agree, else the heartbeats in a row
-- that disagreed, then ":" and when the episode began (ms) once it has.
local assigned = redis.call('HLEN', K.assigned)
local stored_mismatch = fields[11] or ''
local beats, since = stored_mismatch:match('^(%d+):?(%d*)$')
local mismatch, running_mismatch = '', ''
if P.running_jobs ~= assigned then
  beats, since = (tonumber(beats) or 0) + 1, since or ''
  if beats >= P.mismatch_heartbeats and since == '' then mismatch, since = 'began', now end
  running_mismatch = beats .. (since ~= '' and (':' .. since) or '')
elseif since and since ~= '' then
  mismatch = 'ended'
end
local writes = {'consecutive_ok', ok_run, 'consecutive_fail', fail_run, 'window', window}
if running_mismatch ~= stored_mismatch then
  table.insert(writes, 'running_mismatch') table.insert(writes, running_mismatch)
end
redis.call('HSET', K.node, unpack(writes))

-- A node degraded for JobFailures cools down before it may be ready again, whatever its heartbeats say.
local cooling = cooling_down(fields[10], now)

local to, reason = nil, nil
if status == NodeStatus.REGISTERING then
  if P.healthy and ok_run >= P.success_threshold and not cooling then
    to, reason = NodeStatus.READY, ok_run .. ' consecutive healthy heartbeats'
  elseif not P.healthy and now - tonumber(fields[4]) >= P.warmup_ms then
    to, reason = NodeStatus.DEGRADED, 'warmup timeout: not healthy ' ..
      math.floor(P.warmup_ms / 1000) .. ' s after registration (' .. P.health_reason .. ')'
  end
elseif status == NodeStatus.READY and not P.healthy then
  local _, failures = window:gsub('0', '')
  if fail_run >= P.consecutive_failure_threshold then
    to, reason = NodeStatus.DEGRADED, fail_run .. ' consecutive failed health checks (' .. P.health_reason .. ')'
  elseif failures >= P.failure_rate_threshold then
    to, reason = NodeStatus.DEGRADED, failures .. ' of the last ' .. #window ..
      ' health checks failed (' .. P.health_reason .. ')'
  end
elseif status == NodeStatus.DEGRADED and P.healthy and not cooling then
  to, reason = NodeStatus.READY, 'health check passed'
end
local extra = nil
if to == NodeStatus.READY and (fields[10] or '') ~= '' then
  reason, extra = reason .. ' (job failures cool-down over)', {'job_cooldown_until_ms', ''}
end

if to then
  transition(node_id, to, reason, now, extra)
  if to == NodeStatus.READY or to == NodeStatus.DEGRADED then
    if resume_pending_drain(node_id, now) then
      local final = redis.call('HMGET', K.node, 'status', 'status_reason')
      to, reason = final[1], final[2]
    end
  end
end
more_work = more_work or to == NodeStatus.READY
local kick = (more_work and redis.call('ZCARD', K.waiting) > 0) and '1' or '0'
if to then return {'ok', to, '1', status, reason, kick, mismatch, assigned} end
return {'ok', status, '0', status, '', kick, mismatch, assigned}
