--#include job
-- dispatch_job: the dispatch filter, the choice of a node and the assignment,
-- in one atomic step: the slot is reserved, the job recorded as assigned and
-- its job_assign queued for the node together, or nothing changes.
--
-- KEYS: the job bundle, then for each candidate in P.candidates: its node
--       hash, its assigned-jobs hash and its queue (three keys each).
-- P: job_id, needs_class, now_ms, epoch (read together with the candidates; "" when unset),
--    candidates (node ids, least loaded first), heartbeat_timeout_ms,
--    resource_threshold, examples (how many ids to keep per reason), wake_channel
-- Filter, in the contract's order; the first failing step names the reason:
--   1 status ready, 2 heard from within the heartbeat timeout (StatusNotReady),
--   3 public jobs only on nodes accepting them (NotInPublicPool),
--   3b every node_selector label present (NodeSelectorMismatch),
--   4 a GPU available when required (GpuUnavailable),
--   5 every required model ready (ModelNotAvailable),
--   6 assigned jobs below max_concurrent_jobs (CapacityExceeded),
--   7 cpu, gpu and mem below the threshold (ResourceThresholdExceeded).
-- Among eligible nodes: the least loaded (assigned / max), then the lowest
-- usage, then the one assigned to longest ago; a node the job just left is
-- taken only when no other fits.
-- Returns: {"assigned", node id, attempt, exclusions JSON, ms waited since the job (last) began waiting}
--          {"waiting", exclusions JSON}: no candidate fits
--          {"retry", exclusions JSON}: none fits, but the epoch moved: read again
--          {"not_waiting", state}

local job = job_get('state', 'attempt', 'job_type', 'payload', 'required_models', 'require_gpu', 'public',
  'timeout_seconds', 'timeout_ms', 'node_selector', 'avoid', 'waiting_since_ms')
if job.state ~= 'waiting' then return {'not_waiting', job.state or 'unknown'} end
local required = cjson.decode(job.required_models)
local selector = cjson.decode(job.node_selector)
local avoid = {}
for _, node_id in ipairs(cjson.decode(job.avoid or '[]')) do avoid[node_id] = true end
local counts, examples = {}, {}

local function exclude(reason, node_id)
  counts[reason] = (counts[reason] or 0) + 1
  examples[reason] = examples[reason] or {}
  if #examples[reason] < P.examples then table.insert(examples[reason], node_id) end
end

local function number(value)
  return (value and value ~= '') and tonumber(value) or 0
end

local best = nil
for i, node_id in ipairs(P.candidates) do
  local base = NEXT + (i - 1) * 3
  local node_key, assigned_key = KEYS[base], KEYS[base + 1]
  local n = redis.call('HMGET', node_key, 'status', 'last_seen_ms', 'accept_public', 'labels', 'gpu_available',
    'models', 'max_concurrent_jobs', 'cpu_percent', 'gpu_percent', 'mem_percent', 'last_assigned_ms')
  local reason = nil
  if n[1] ~= 'ready' then
    reason = 'StatusNotReady'
  elseif P.now_ms - number(n[2]) >= P.heartbeat_timeout_ms then
    reason = 'StatusNotReady'
  elseif job.public == '1' and n[3] ~= '1' then
    reason = 'NotInPublicPool'
  end
  if not reason then
    local labels = cjson.decode(n[4] or '{}')
    for key, value in pairs(selector) do
      if labels[key] ~= value then reason = 'NodeSelectorMismatch' break end
    end
  end
  if not reason and job.require_gpu == '1' and n[5] ~= '1' then reason = 'GpuUnavailable' end
  if not reason then
    local ready = {}
    for _, model in ipairs(cjson.decode(n[6] or '[]')) do
      if model.status == 'ready' then ready[model.model_id] = true end
    end
    for _, model_id in ipairs(required) do
      if not ready[model_id] then reason = 'ModelNotAvailable' break end
    end
  end
  local assigned, max_jobs = 0, number(n[7])
  if not reason then
    assigned = redis.call('HLEN', assigned_key)
    if assigned >= max_jobs then reason = 'CapacityExceeded' end
  end
  local usage = math.max(number(n[8]), number(n[9]), number(n[10]))
  if not reason and usage >= P.resource_threshold then reason = 'ResourceThresholdExceeded' end
  if reason then
    exclude(reason, node_id)
  else
    local rank = {avoid[node_id] and 1 or 0, assigned / max_jobs, usage, number(n[11])}
    local better = best == nil
    if not better then
      for k = 1, 4 do
        if rank[k] ~= best.rank[k] then better = rank[k] < best.rank[k] break end
      end
    end
    if better then best = {rank = rank, index = i, node_id = node_id, assigned = assigned, max_jobs = max_jobs} end
  end
end

local exclusions = cjson.encode({counts = counts, examples = examples})
local decision_at = P.now_ms
if best == nil then
  if (redis.call('GET', J.epoch) or '') ~= P.epoch then return {'retry', exclusions} end
  return {'waiting', exclusions}
end

local base = NEXT + (best.index - 1) * 3
local node_key, assigned_key, queue_key = KEYS[base], KEYS[base + 1], KEYS[base + 2]
local node_id, attempt, now = best.node_id, tonumber(job.attempt) + 1, P.now_ms
-- Built by hand so the payload reaches the node exactly as submitted
-- (decoding and encoding it here would turn [] into {}).
local frame = '{"type":"job_assign","job_id":' .. cjson.encode(P.job_id) .. ',"attempt":' .. attempt ..
  ',"job_type":' .. cjson.encode(job.job_type) .. ',"payload":' .. job.payload ..
  ',"required_models":' .. job.required_models .. ',"require_gpu":' .. (job.require_gpu == '1' and 'true' or 'false') ..
  ',"timeout_seconds":' .. job.timeout_seconds .. '}'
redis.call('HSET', assigned_key, P.job_id, frame)
deliver_to(queue_key, node_id, frame)
redis.call('HSET', node_key, 'last_assigned_ms', now)
refresh_capacity_of(node_key, assigned_key, J.capacity_index, node_id)
redis.call('HSET', J.job, 'state', 'assigned', 'attempt', attempt, 'node_id', node_id, 'assigned_ms', now,
  'acked_ms', '', 'progress', '', 'progress_message', '',
  'last_decision', cjson.encode({outcome = 'assigned', node_id = node_id, at_ms = decision_at,
    examined = #P.candidates, counts = counts, examples = examples}))
wait_leave(P.job_id, P.needs_class)
redis.call('ZADD', J.deadlines, now + tonumber(job.timeout_ms), P.job_id)
redis.call('RPUSH', J.job_attempts, cjson.encode({attempt = attempt, node_id = node_id, assigned_ms = now}))
return {'assigned', node_id, attempt, exclusions, now - tonumber(job.waiting_since_ms)}
