-- Prelude of the scripts that include both `job` and `node`: K is the bundle
-- of the node the job's current attempt runs on.

-- The job leaves its node: the slot is free again (dispatchers are told by
-- the epoch), its job_assign is forgotten, and a draining node with nothing
-- left goes offline.
local function release_slot(node_id, job_id, now_ms)
  redis.call('HDEL', K.assigned, job_id)
  refresh_capacity(node_id)
  redis.call('INCR', K.epoch)
  if redis.call('HGET', K.node, 'status') == 'draining' and redis.call('HLEN', K.assigned) == 0 then
    finish_drain(node_id, 'drained: its last job ended', now_ms)
  end
end
