-- touch: a media request's look-up by session id. Renews an active session whose last renewal
-- (expires - ttl) is at least `renew after` ms old: the implicit heartbeat of a playing viewer.
-- KEYS[1] P..'s:'..id (the account's keys are found from it and share its slot)
-- ARGV: P, id, ttl ms, renew after ms, origin, channel
-- Reply: {session or false, renewed (0 | 1), expired}
local P, id, ttl, renew_after = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local origin, channel = ARGV[5], ARGV[6]
local A = redis.call('HGET', KEYS[1], 'akey')
if not A then
  return {false, 0, {}}
end
local now = now_ms()
local expired = expire_overdue(P, A, now, origin, channel)
local rec = answerable(record(P, id), now)
if rec and rec[4] == 'active' and now - (rec[7] - rec[8]) >= renew_after then
  return {renew(P, A, id, now, ttl), 1, expired}
end
return {rec, 0, expired}
