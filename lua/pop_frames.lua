-- pop_frames: take the frames queued for a node, for the session that holds it.
--
-- KEYS[1]: the node hash   KEYS[2]: the node's queue
-- ARGV[1]: session id      ARGV[2]: most frames to take
-- Returns: the frames, oldest first (possibly none), or false when another
--          session holds the node (the caller's session is superseded).

if redis.call('HGET', KEYS[1], 'session_id') ~= ARGV[1] then return false end
return redis.call('LPOP', KEYS[2], tonumber(ARGV[2])) or {}
