-- kick: revokes an active session for a reason ('kicked' by an admin, 'shared' by sharing
-- detection, 'denied' by a session validator).
-- KEYS[1] P..'s:'..id (the account's keys are found from it and share its slot)
-- ARGV: P, id, reason, origin, channel
-- Reply: {'kicked', session, expired} | {'gone', session, expired} | {'notfound', false, expired}
local P, id, reason, origin, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local A = redis.call('HGET', KEYS[1], 'akey')
if not A then
  return {'notfound', false, {}}
end
local now = now_ms()
local expired = expire_overdue(P, A, now, origin, channel)
local rec = answerable(record(P, id), now)
if not rec then
  return {'notfound', false, expired}
end
if rec[4] ~= 'active' then
  return {'gone', rec, expired}
end
return {'kicked', cut(P, A, id, reason, now, now, origin, channel), expired}
