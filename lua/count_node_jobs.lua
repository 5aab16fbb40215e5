-- count_node_jobs: add a process's sums of jobs finished to the records of the
-- nodes that ran them (dispatcher/tally.py, once a second, only when per-node
-- metrics are on). A node deleted meanwhile is not brought back as a record
-- holding nothing but counts. Plain KEYS/ARGV, no prelude, and no constants: it names
-- no domain word (the fields' names, finished_<state>, come from the caller).
--
-- KEYS[i]: a node hash
-- ARGV[i]: JSON object {field: count} to add to KEYS[i] (fields "finished_<state>")
-- Writes: no bundle key (no prelude): the node hashes in KEYS (HINCRBY)
-- Returns: how many of the nodes still existed

local counted = 0
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    for field, n in pairs(cjson.decode(ARGV[i])) do redis.call('HINCRBY', key, field, n) end
    counted = counted + 1
  end
end
return counted
