-- get: one session by id, active or cut within its TTL; expires the account's overdue sessions
-- first so an overdue one is reported as expired.
-- KEYS[1] P..'s:'..id (the account's keys are found from it and share its slot)
-- ARGV: P, id, origin, channel
-- Reply: {session or false, expired}
local P, id, origin, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local A = redis.call('HGET', KEYS[1], 'akey')
if not A then
  return {false, {}}
end
local now = now_ms()
local expired = expire_overdue(P, A, now, origin, channel)
return {answerable(record(P, id), now), expired}
