-- heartbeat: renews the active session of (account, stream).
-- KEYS[1] A..'streams', KEYS[2] A..'age', KEYS[3] A..'exp', KEYS[4] A..'cut'
-- ARGV: P, A, stream, ttl ms, origin, channel
-- Reply: {'renewed', active count, session, expired} | {'gone', 0, session, expired}
--      | {'notfound', 0, false, expired}
local P, A, stream, ttl, origin, channel = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local now = now_ms()
local expired = expire_overdue(P, A, now, origin, channel)
local id = redis.call('HGET', KEYS[1], stream)
if id then
  local rec = renew(P, A, id, now, ttl)
  return {'renewed', redis.call('ZCARD', KEYS[2]), rec, expired}
end
local cut_id = redis.call('HGET', KEYS[4], stream)
if cut_id then
  local rec = answerable(record(P, cut_id), now)
  if rec then
    return {'gone', 0, rec, expired}
  end
end
return {'notfound', 0, false, expired}
