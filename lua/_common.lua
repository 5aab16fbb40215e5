-- Helpers shared by every script with a prelude (the loader puts this file
-- first). Nothing here uses a key bundle: keys are arguments.
--
-- The loader defines, before this text:
--   K      the node bundle when the script includes `node` (dispatcher.keys.NODE_BUNDLE)
--   J      the job bundle when it includes `job` (dispatcher.keys.JOB_BUNDLE)
--   NEXT   the index in KEYS of the first key after the bundles
--   P      the script's parameters, decoded from the JSON in ARGV[1]
--   NODE_STATUSES, the statuses in order, when the script's text names it
-- and writes in the value of each constant of dispatcher/vocabulary.py the text names
-- (NodeStatus.READY becomes 'ready'; also ModelState, JobState, CeleryState, Exclusion,
-- FailureCode, CloseCode): a script writes no domain word as a literal (tests/test_lua_loader.py
-- checks it), and no call pays for tables of constants.
-- Times are milliseconds from the caller's clock (P.now_ms); scripts never read TIME.
--
-- Each script's header lists after `Writes:` the bundle keys it may write, in its own text
-- and in the prelude functions it calls (K[status]: the status sets); tests/test_lua_loader.py
-- checks the list.

-- Queue one frame for a node's session and wake the web process holding it.
local function deliver_to(queue_key, node_id, frame)
  redis.call('RPUSH', queue_key, frame)
  redis.call('PUBLISH', P.wake_channel, node_id)
end

-- The capacity index holds the ready, uncordoned nodes with a free slot, scored by their load
-- (assigned / max_concurrent_jobs), then (in the last digits) by when they were
-- last given or freed a slot: the dispatcher reads the least loaded first, and
-- equally loaded nodes take turns.
local function set_capacity(capacity_key, node_id, assigned, max_jobs, now_ms)
  if assigned < max_jobs then
    redis.call('ZADD', capacity_key, assigned / max_jobs + (now_ms % 100000000) * 1e-12, node_id)
  else
    redis.call('ZREM', capacity_key, node_id)
  end
end

-- A cordoned node stays out of the index whatever its load: it takes no new job.
local function refresh_capacity_of(node_key, assigned_key, capacity_key, node_id, now_ms)
  local assigned = redis.call('HLEN', assigned_key)
  local n = redis.call('HMGET', node_key, 'max_concurrent_jobs', 'cordoned')
  set_capacity(capacity_key, node_id, assigned, n[2] == '1' and 0 or (tonumber(n[1] or '') or 1), now_ms)
  return assigned
end
