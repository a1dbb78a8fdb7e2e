-- get: one session by id, active or cut within its TTL; expires the account's overdue sessions
-- first so an overdue one is reported as expired.
-- KEYS[1] the tag hash of the id
-- ARGV: id (16 raw bytes), origin, channel
-- Reply: {session or false, expired}
local id, origin, channel = ARGV[1], ARGV[2], ARGV[3]
local h, s = find(KEYS[1], id)
if not h then
  return {false, EMPTY}
end
local now = now_ms()
local expired = expire_overdue(h, now, origin, channel)
save(h)
if answerable(s, now) then
  return {record(h, s), expired}
end
return {false, expired}
