-- find_candidates: the least loaded ready nodes with a free slot that are in
-- every index set the job needs and were heard from within the timeout, and
-- the epoch they were read at (so that the dispatch script can tell when its
-- view went stale). Read-only but for a scratch key it deletes again.
-- Plain KEYS/ARGV, no prelude: it reads indexes only.
--
-- It walks the capacity index in load order, a page at a time, checking each
-- page against the sets with one SMISMEMBER per set: in a healthy fleet the
-- first page answers, whatever the fleet's size. When ``budget`` nodes were
-- looked at without finding enough (a rare model, a narrow selector), it
-- intersects the sets instead, which costs about the smallest of them.
--
-- KEYS[1] capacity index   KEYS[2] liveness index   KEYS[3] epoch
-- KEYS[4] a scratch key    KEYS[5..] the sets a candidate must be in
-- ARGV[1] now_ms   ARGV[2] heartbeat_timeout_ms   ARGV[3] candidates wanted
-- ARGV[4] budget (nodes looked at before intersecting)
-- Returns: {candidate ids, least loaded first; epoch ("" when unset)}

local fresh_after = tonumber(ARGV[1]) - tonumber(ARGV[2])
local wanted, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local page_size = math.max(2 * wanted, 8)
local found = {}

local function keep_live(ids)
  if #ids == 0 then return end
  local seen = redis.call('ZMSCORE', KEYS[2], unpack(ids))
  for i, node_id in ipairs(ids) do
    if seen[i] and tonumber(seen[i]) > fresh_after then
      found[#found + 1] = node_id
      if #found == wanted then return end
    end
  end
end

local offset = 0
while #found < wanted and offset < budget do
  local page = redis.call('ZRANGE', KEYS[1], offset, offset + page_size - 1)
  if #page == 0 then break end
  local passing = page
  for k = 5, #KEYS do
    local member = redis.call('SMISMEMBER', KEYS[k], unpack(passing))
    local still = {}
    for i, node_id in ipairs(passing) do
      if member[i] == 1 then still[#still + 1] = node_id end
    end
    passing = still
    if #passing == 0 then break end
  end
  keep_live(passing)
  offset = offset + page_size
  if #page < page_size then break end
end

if #found < wanted and offset >= budget then
  -- Rare needs: intersect, weighting the sets 0 so each node keeps its load as score.
  found = {}
  local args = {'ZINTERSTORE', KEYS[4], #KEYS - 3, KEYS[1]}
  for k = 5, #KEYS do args[#args + 1] = KEYS[k] end
  args[#args + 1] = 'WEIGHTS'
  args[#args + 1] = 1
  for _ = 5, #KEYS do args[#args + 1] = 0 end
  redis.call(unpack(args))
  keep_live(redis.call('ZRANGE', KEYS[4], 0, 4 * wanted - 1))
  redis.call('DEL', KEYS[4])
end
return {found, redis.call('GET', KEYS[3]) or ''}
