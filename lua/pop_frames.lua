-- pop_frames: take the frames queued for a node, for the session that holds it.
-- Plain KEYS/ARGV, no prelude: the web process calls it for every delivery, and
-- it needs neither a bundle nor the JSON parameters. It names no domain word
-- (status, state, code) either, so it needs none of the vocabulary's constants.
--
-- Positional ARGV rather than the other scripts' named P (JSON in ARGV[1]), on purpose:
-- this is the hot path. Measured on the development machine (Redis 7.0, 2 cores, idle):
-- bench/script_floor.py puts decoding a small JSON parameter at about 0.5 us of Redis time
-- per call (1.2-1.3 us without, 1.7-1.8 us with), against about 3.2 us for a whole
-- pop_frames call taking one frame; and the web process would spend about 1.9 us of its
-- own CPU per call encoding the JSON (json.dumps of the three values).
--
-- KEYS[1]: the node hash   KEYS[2]: the node's queue
-- ARGV[1]: session id      ARGV[2]: most frames to take
-- ARGV[3]: most bytes to take (the first frame is taken whatever its size)
-- Writes: no bundle key (no prelude): KEYS[2], the node's queue (LTRIM)
-- Returns: the frames, oldest first (possibly none), or false when another
--          session holds the node (the caller's session is superseded).

if redis.call('HGET', KEYS[1], 'session_id') ~= ARGV[1] then return false end
local frames = redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)
local max_bytes, taken, size = tonumber(ARGV[3]), 0, 0
for i, frame in ipairs(frames) do
  if i > 1 and size + #frame > max_bytes then break end
  taken, size = i, size + #frame
end
if taken == 0 then return {} end
redis.call('LTRIM', KEYS[2], taken, -1)
if taken < #frames then
  for i = #frames, taken + 1, -1 do frames[i] = nil end
end
return frames
