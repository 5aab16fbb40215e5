-- Prelude of the scripts that include `job`: the job bundle J, and when the
-- script also includes `node`, the bundle K of the node running the job.
--
-- A job is `waiting`, `assigned` (queued for its node), `running` (the node
-- acknowledged it), or finished: `succeeded`, `failed`, `cancelled`. Its
-- attempts that ended are a JSON list in its own hash (field `attempts`);
-- the current one is the `attempt`, `node_id`, `assigned_ms`, `acked_ms` fields.
--
-- A waiting job is in J.waiting (all of them, in order) and in the sorted set
-- of its kind of needs, J.waiting_class (P.needs_class names the kind); the
-- kinds are ranked by their first job in J.waiting_classes. A pass over the
-- waiting jobs then tries each kind once, whatever the number of jobs.

-- Refuse, before anything is written, a job id that could name another key.
if type(P.job_id) ~= 'string' or #P.job_id > 128 or not P.job_id:match('^[%w_.-]+$') then
  return redis.error_reply('invalid job id')
end

local TERMINAL = {[JobState.SUCCEEDED] = true, [JobState.FAILED] = true, [JobState.CANCELLED] = true}

--- The job fields a script that ends or requeues an attempt reads (with HMGET, once).
local LIFE_FIELDS = {'state', 'attempt', 'node_id', 'assigned_ms', 'acked_ms', 'attempts', 'needs_class', 'needs',
  'queue_score', 'dispatch_timeout_ms', 'max_attempts', 'timeout_ms', 'avoid', 'worker', 'submitted_ms'}

-- The job's fields, read once. Every script that is given P.needs_class reads
-- `needs_class` too: J.waiting_class was built from P.needs_class, so a job of
-- another kind is refused here, before anything is written.
local function job_get(fields)
  local values = redis.call('HMGET', J.job, unpack(fields))
  local job = {}
  for i, name in ipairs(fields) do
    job[name] = values[i] ~= false and values[i] or nil
  end
  if job.needs_class and P.needs_class ~= nil and P.needs_class ~= cjson.null
      and job.needs_class ~= P.needs_class then
    error('job ' .. P.job_id .. ' is of kind ' .. job.needs_class .. ', not ' .. P.needs_class)
  end
  return job
end

-- The job's attempts with the current one closed: the `attempts` field to write.
local function attempts_with_current(job, outcome, now_ms)
  local attempts = cjson.decode(job.attempts or '[]')
  if job.node_id and job.node_id ~= '' then
    table.insert(attempts, {attempt = tonumber(job.attempt), node_id = job.node_id,
      assigned_ms = tonumber(job.assigned_ms), acked_ms = tonumber(job.acked_ms), ended_ms = now_ms,
      outcome = outcome})
  end
  return cjson.encode(attempts)
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
  if redis.call('ZADD', J.waiting_classes, 'LT', score, needs_class) == 1 then
    redis.call('HSET', J.waiting_needs, needs_class, needs)  -- a kind that was not waiting
  end
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

-- Celery's result meta, as its Redis backend stores it: SET with its expiry, then
-- PUBLISH on the key's channel (a client blocked in get() listens there). Written
-- here, with our own record of the job, so the two always agree: a final state is
-- written once, by the script that ends the job, and nothing is written after it.
local function celery_state(status, result_json, traceback)
  local done = (status == CeleryState.SUCCESS or status == CeleryState.FAILURE or status == CeleryState.REVOKED)
    and cjson.encode(P.done_at) or 'null'
  local meta = '{"status": "' .. status .. '", "result": ' .. result_json .. ', "traceback": ' ..
    cjson.encode(traceback or cjson.null) .. ', "children": [], "date_done": ' .. done ..
    ', "task_id": ' .. cjson.encode(P.job_id) .. '}'
  redis.call('SET', J.result, meta, 'EX', P.result_expires_s)
  redis.call('PUBLISH', J.result, meta)
end

-- What a client's get() raises for a failed job (by name: dispatcher.errors), and the
-- text Flower and `celery result --traceback` show.
local FAILURE_TYPES = {[FailureCode.NO_ELIGIBLE_NODE] = 'NoEligibleNode', [FailureCode.TIMEOUT] = 'JobTimedOut',
  [FailureCode.NODE_LOST] = 'NodeLost', [FailureCode.DRAIN_DEADLINE] = 'NodeLost'}

local function failure_text(outcome)
  local code = outcome.code or 'FAILED'
  local text = FAILURE_TYPES[code] and (outcome.message or '') or (code .. ': ' .. (outcome.message or ''))
  if outcome.node_id and outcome.node_id ~= '' and code ~= FailureCode.NO_ELIGIBLE_NODE then
    text = text .. ' (node ' .. outcome.node_id .. ', attempt ' .. tostring(outcome.attempt) .. ' of ' ..
      tostring(outcome.max_attempts) .. ')'
  end
  return FAILURE_TYPES[code] or 'JobFailed', text
end

-- The job ends for good (``job`` holds LIFE_FIELDS; ``extra``: more fields to
-- write; ``output``: a success's JSON text, as the node sent it).
local function finish(job, state, outcome, now_ms, extra, output)
  if job.state == JobState.WAITING then wait_leave(P.job_id, job.needs_class) end
  -- For the task events: the Celery worker that took the submission (Flower's worker
  -- link must reach a real worker), and how long the node had the job when the node
  -- does not say (Flower's runtime).
  outcome.worker = job.worker
  local since = tonumber(job.acked_ms) or tonumber(job.assigned_ms)
  if outcome.node_id and outcome.node_id ~= '' and since and not outcome.duration_ms then
    outcome.duration_ms = now_ms - since
  end
  if state == JobState.SUCCEEDED then
    celery_state(CeleryState.SUCCESS, output)
  elseif state == JobState.FAILED then
    local exc_type, text = failure_text(outcome)
    outcome.text = text
    celery_state(CeleryState.FAILURE, cjson.encode({exc_type = exc_type, exc_message = {text},
      exc_module = 'dispatcher.errors'}), 'Job ' .. P.job_id .. ' failed: ' .. exc_type .. ': ' .. text)
  else
    outcome.text = 'cancelled: ' .. (outcome.reason ~= '' and outcome.reason or 'no reason given')
    celery_state(CeleryState.REVOKED, cjson.encode({exc_type = 'TaskRevokedError', exc_message = {outcome.text},
      exc_module = 'celery.exceptions'}))
  end
  redis.call('HSET', J.job, 'state', state, 'finished_ms', now_ms, 'outcome', cjson.encode(outcome),
    'attempts', attempts_with_current(job, state, now_ms), unpack(extra or {}))
  redis.call('ZREM', J.deadlines, P.job_id)
  redis.call('EXPIRE', J.job, math.floor(P.retention_ms / 1000))
  -- Listed by final state, newest submitted first (dispatcher/joblist.py).
  redis.call('ZADD', J['finished_' .. state], tonumber(job.submitted_ms) or now_ms, P.job_id)
  return outcome
end

-- The job waits for a node again, keeping its place (priority, then first
-- submission); the node it just left is avoided when another one can take it.
local function back_to_waiting(job, outcome, now_ms, extra)
  check_class(job.needs_class)
  local avoid = cjson.decode(job.avoid or '[]')
  table.insert(avoid, job.node_id)
  redis.call('HSET', J.job, 'state', JobState.WAITING, 'node_id', '', 'waiting_since_ms', now_ms,
    'avoid', cjson.encode(avoid), 'progress', '', 'progress_message', '',
    'attempts', attempts_with_current(job, outcome, now_ms), unpack(extra or {}))
  wait_enter(P.job_id, job.queue_score, job.needs_class, job.needs)
  redis.call('ZADD', J.deadlines, now_ms + tonumber(job.dispatch_timeout_ms), P.job_id)
end

-- --- choosing a node and assigning -------------------------------------------
-- The candidates are the least loaded ready nodes with a free slot (J.capacity_index
-- holds ready, uncordoned nodes only) that are in every index set the job needs (KEYS[NEXT] on)
-- and were heard from within the timeout. The filter re-checks each in the contract's
-- order; the first failing step names the node's exclusion reason. A candidate's own
-- keys are named from P.node_key (dispatcher.keys.Keys.node_key_parts): they share the
-- declared keys' prefix, whose braces make it the Redis Cluster hash tag of them all.

-- The capacity index is read a page at a time, each page checked with one SMISMEMBER per
-- set: in a healthy fleet the first page answers, whatever the fleet's size. When it does
-- not, the sets' sizes say whether paging on would look at more than P.budget nodes (a rare
-- model, a narrow selector): then, or when P.budget nodes were looked at without finding
-- P.wanted, the sets are intersected instead, which costs about the smallest of them. An
-- empty set ends the search.
local function find_candidates()
  local fresh_after = P.now_ms - P.heartbeat_timeout_ms
  local page_size = math.max(2 * P.wanted, 8)
  local found = {}
  -- (paging on would look at more than P.budget nodes, no node can match)
  local function paging_outlook()
    local ready_with_room = redis.call('ZCARD', J.capacity_index)
    local smallest = ready_with_room
    for k = NEXT, #KEYS do
      smallest = math.min(smallest, redis.call('SCARD', KEYS[k]))
    end
    if smallest == 0 then return true, true end
    -- As if the smallest set's members were spread evenly through the index.
    return P.wanted * ready_with_room / smallest > P.budget, false
  end
  local function keep_live(ids)
    if #ids == 0 then return end
    local seen = redis.call('ZMSCORE', J.liveness, unpack(ids))
    for i, node_id in ipairs(ids) do
      if seen[i] and tonumber(seen[i]) > fresh_after then
        found[#found + 1] = node_id
        if #found == P.wanted then return end
      end
    end
  end
  local offset = 0
  while #found < P.wanted and offset < P.budget do
    local page = redis.call('ZRANGE', J.capacity_index, offset, offset + page_size - 1)
    if #page == 0 then break end
    local passing = page
    for k = NEXT, #KEYS do
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
    if #page < page_size then return found end
    if offset == page_size and #found < P.wanted then
      local too_long, none = paging_outlook()
      if none then return found end
      if too_long then offset = P.budget end
    end
  end
  if #found < P.wanted and offset >= P.budget then
    -- Weighting the sets 0 keeps each node's load as its score; the reply comes least loaded first.
    found = {}
    local args = {'ZINTER', #KEYS - NEXT + 2, J.capacity_index}
    for k = NEXT, #KEYS do args[#args + 1] = KEYS[k] end
    args[#args + 1] = 'WEIGHTS'
    args[#args + 1] = 1
    for _ = NEXT, #KEYS do args[#args + 1] = 0 end
    local all = redis.call(unpack(args))
    keep_live({unpack(all, 1, math.min(#all, 4 * P.wanted))})
  end
  return found
end

local function number(value)
  return (value and value ~= '') and tonumber(value) or 0
end

-- A job's needs as the filter reads them, from its record's fields or from a
-- kind's needs JSON (JobNeeds.to_json): {public, require_gpu, models, selector}.
local function needs_of_record(job)
  return {public = job.public == '1', require_gpu = job.require_gpu == '1',
    models = cjson.decode(job.required_models), selector = cjson.decode(job.node_selector)}
end

local function needs_of_kind(text)
  local n = cjson.decode(text)
  return {public = n.public, require_gpu = n.require_gpu, models = n.required_models, selector = n.node_selector}
end

--- The node fields of the filter's steps that depend on the job, in this order, then
--- `cordoned` (read with them, so that no script reads it on its own).
local NODE_STATIC = {'accept_public', 'labels', 'gpu_available', 'models', 'cordoned'}

-- Whether an operator cordoned the node (``n`` holds NODE_STATIC's values from n[first]).
local function is_cordoned(n, first)
  return n[first + 4] == '1'
end

-- The first of the job-dependent steps (3 to 5) the node fails, or nil.
-- ``n`` holds NODE_STATIC's values at n[first], n[first + 1] ...
local function static_reason(needs, n, first)
  if needs.public and n[first] ~= '1' then return Exclusion.NOT_IN_PUBLIC_POOL end
  if next(needs.selector) ~= nil then
    local labels = cjson.decode(n[first + 1] or '{}')
    for key, value in pairs(needs.selector) do
      if labels[key] ~= value then return Exclusion.NODE_SELECTOR_MISMATCH end
    end
  end
  if needs.require_gpu and n[first + 2] ~= '1' then return Exclusion.GPU_UNAVAILABLE end
  if #needs.models > 0 then
    local ready = {}
    for _, model in ipairs(cjson.decode(n[first + 3] or '[]')) do
      if model.status == ModelState.READY then ready[model.model_id] = true end
    end
    for _, model_id in ipairs(needs.models) do
      if not ready[model_id] then return Exclusion.MODEL_NOT_AVAILABLE end
    end
  end
  return nil
end

-- Whether a job waiting ahead of ``score`` in the queue (more urgent, or as urgent and
-- older) needs nothing the node lacks: then it, not a newcomer, should have the slot.
-- Kinds are looked at up to 32; past that, the answer is yes (a pass decides).
local function waiting_could_take(n, first, score)
  local kinds = redis.call('ZRANGE', J.waiting_classes, '-inf', '(' .. score, 'BYSCORE', 'LIMIT', 0, 33)
  if #kinds == 0 then return false end
  if #kinds > 32 then return true end
  for _, text in ipairs(redis.call('HMGET', J.waiting_needs, unpack(kinds))) do
    if not text or not static_reason(needs_of_kind(text), n, first) then return true end
  end
  return false
end

-- The first candidate that passes every step, preferring any to one in
-- ``avoid``. Returns the pick ({index, node_id, assigned, max_jobs, n}) or nil,
-- and the exclusions {counts = {reason = n}, examples = {reason = {ids}}}.
local function pick_node(needs, avoid)
  local counts, examples = {}, {}
  local fallback = nil
  for i, node_id in ipairs(find_candidates()) do
    local node_key = P.node_key.head .. node_id
    local n = redis.call('HMGET', node_key, 'status', 'last_seen_ms', 'max_concurrent_jobs', 'cpu_percent',
      'gpu_percent', 'mem_percent', unpack(NODE_STATIC))
    local reason, assigned, max_jobs = nil, 0, number(n[3])
    if n[1] ~= NodeStatus.READY or P.now_ms - number(n[2]) >= P.heartbeat_timeout_ms then
      reason = Exclusion.STATUS_NOT_READY
    else
      -- (a cordoned node is never in the capacity index: checked for the filter's sake)
      reason = static_reason(needs, n, 7) or (is_cordoned(n, 7) and Exclusion.NODE_CORDONED or nil)
    end
    if not reason then
      assigned = redis.call('HLEN', node_key .. P.node_key.assigned)
      if assigned >= max_jobs then reason = Exclusion.CAPACITY_EXCEEDED end
    end
    if not reason and math.max(number(n[4]), number(n[5]), number(n[6])) >= P.resource_threshold then
      reason = Exclusion.RESOURCE_THRESHOLD_EXCEEDED
    end
    if reason then
      counts[reason] = (counts[reason] or 0) + 1
      examples[reason] = examples[reason] or {}
      if #examples[reason] < P.examples then table.insert(examples[reason], node_id) end
    else
      local pick = {index = i, node_id = node_id, node_key = node_key, assigned = assigned, max_jobs = max_jobs,
        n = n}
      if not avoid[node_id] then return pick, {counts = counts, examples = examples} end
      fallback = fallback or pick
    end
  end
  return fallback, {counts = counts, examples = examples}
end

-- Reserve the slot, record the assignment and queue job_assign, together.
-- Returns the attempt number and the frame. ``job`` holds the spec fields.
local function assign(job, pick, now_ms)
  local attempt = tonumber(job.attempt or 0) + 1
  -- Built by hand so the payload reaches the node exactly as submitted
  -- (decoding and encoding it here would turn [] into {}).
  local frame = '{"type":"job_assign","job_id":' .. cjson.encode(P.job_id) .. ',"attempt":' .. attempt ..
    ',"job_type":' .. cjson.encode(job.job_type) .. ',"payload":' .. job.payload ..
    ',"required_models":' .. job.required_models .. ',"require_gpu":' ..
    (job.require_gpu == '1' and 'true' or 'false') .. ',"timeout_seconds":' .. job.timeout_seconds .. '}'
  redis.call('HSET', pick.node_key .. P.node_key.assigned, P.job_id, frame)
  deliver_to(pick.node_key .. P.node_key.queue, pick.node_id, frame)
  set_capacity(J.capacity_index, pick.node_id, pick.assigned + 1, pick.max_jobs, now_ms)
  redis.call('ZADD', J.deadlines, now_ms + tonumber(job.timeout_ms), P.job_id)
  return attempt
end
