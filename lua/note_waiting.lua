--#include job
-- note_waiting: say why a waiting job waits, where its client looks: its Celery
-- state becomes WAITING with meta {eligible, total, exclusions, examples} (and
-- summary, waiting_since_ms, deadline_ms), and its record's last_decision the same.
--
-- The counts are aggregates of the indexes (ZINTERCARD of each step's keys with
-- the steps before it), never a walk of the fleet. The examples come from a
-- bounded look at the registered nodes, a page at a time, each node's first
-- failing step naming its reason: up to P.examples per reason, found among at
-- most P.budget nodes (a rare reason in a large fleet may show fewer).
--
-- A step is passed by the nodes in all its keys, except an excluding step (one key:
-- the cordoned nodes), passed by the nodes not in its key: its nodes are counted
-- out of those still passing, and must be in none of the next step's keys (the
-- capacity index holds no cordoned node), which keeps them out of the counts after it.
--
-- KEYS: the job bundle, then the key of all nodes, then each step's index keys
--       in the filter's order (sets, or sorted sets such as the capacity index)
-- P: job_id, now_ms, steps ({reason, number of its keys, excluding} in order), examples, budget
-- Writes: J.job, J.result
-- Returns: {"noted", meta JSON, worker (for the task event)} | {"not_waiting", state}

local job = job_get({'state', 'waiting_since_ms', 'dispatch_timeout_ms', 'worker'})
if job.state ~= JobState.WAITING then return {'not_waiting', job.state or 'unknown'} end

local nodes_key = KEYS[NEXT]
local total = redis.call('ZCARD', nodes_key)
local counts, before = {}, total
local step_keys, so_far = {}, {}
local position = NEXT + 1
for i, step in ipairs(P.steps) do
  step_keys[i] = {}
  for _ = 1, step[2] do
    step_keys[i][#step_keys[i] + 1] = KEYS[position]
    position = position + 1
  end
  local after
  if step[3] then
    after = before - redis.call('ZINTERCARD', #so_far + 2, nodes_key, step_keys[i][1], unpack(so_far))
  else
    for _, key in ipairs(step_keys[i]) do so_far[#so_far + 1] = key end
    after = redis.call('ZINTERCARD', #so_far + 1, nodes_key, unpack(so_far))
  end
  if before > after then counts[step[1]] = (counts[step[1]] or 0) + before - after end
  before = after
end
local eligible = before

-- Examples: nodes in pages; each step's keys asked of the nodes still passing.
local is_zset = {}
for i = NEXT + 1, #KEYS do is_zset[KEYS[i]] = redis.call('TYPE', KEYS[i]).ok == 'zset' end
local examples, missing = {}, 0
for reason, _ in pairs(counts) do
  examples[reason] = {}
  missing = missing + 1
end
local page_size, offset = 64, 0
while missing > 0 and offset < P.budget do
  local passing = redis.call('ZRANGE', nodes_key, offset, offset + page_size - 1)
  if #passing == 0 then break end
  offset = offset + page_size
  for i, step in ipairs(P.steps) do
    local failed, still = {}, {}
    for _, key in ipairs(step_keys[i]) do
      if #passing == 0 then break end
      local member = is_zset[key] and redis.call('ZMSCORE', key, unpack(passing))
        or redis.call('SMISMEMBER', key, unpack(passing))
      still = {}
      for j, node_id in ipairs(passing) do
        if (member[j] and member[j] ~= 0) ~= (step[3] == true) then
          still[#still + 1] = node_id
        else
          failed[#failed + 1] = node_id
        end
      end
      passing = still
    end
    local shown = examples[step[1]]
    for _, node_id in ipairs(failed) do
      if not shown or #shown >= P.examples then break end
      shown[#shown + 1] = node_id
      if #shown == P.examples then missing = missing - 1 end
    end
    if #passing == 0 then break end
  end
end

-- (cjson writes an empty table as {}: right for no counts, wrong for an empty list of examples)
for reason, shown in pairs(examples) do
  if #shown == 0 then examples[reason] = nil end
end
local since = tonumber(job.waiting_since_ms) or P.now_ms
local meta = {eligible = eligible, total = total, exclusions = counts, examples = examples,
  waiting_since_ms = since, deadline_ms = since + (tonumber(job.dispatch_timeout_ms) or 0)}
local text = cjson.encode(meta)
celery_state(CeleryState.WAITING, text)
redis.call('HSET', J.job, 'last_decision', cjson.encode({outcome = JobState.WAITING, at_ms = P.now_ms,
  eligible = eligible, total = total, counts = counts, examples = examples}))
return {'noted', text, job.worker or ''}
