-- end: ends the active session of (account, stream). An ended session leaves no tombstone to
-- answer for, only a marker that stops a write-back of it (adopt) for one TTL: another sidecar
-- may hold it as a degraded admission whose id the store admitted after all.
-- KEYS[1] A..'streams', KEYS[2] A..'age', KEYS[3] A..'exp', KEYS[4] A..'cut'
-- ARGV: P, A, stream, origin, channel
-- Reply: {'ended', session, expired} | {'none', false, expired}
local P, A, stream, origin, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = now_ms()
local expired = expire_overdue(P, A, now, origin, channel)
local id = redis.call('HGET', KEYS[1], stream)
if not id then
  return {'none', false, expired}
end
local rec = record(P, id)
redis.call('HDEL', KEYS[1], stream)
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[3], id)
redis.call('DEL', P .. 's:' .. id)
if rec then
  local until_ms = now + rec[8]
  redis.call('SET', P .. 'e:' .. id, until_ms, 'PXAT', until_ms)
end
return {'ended', rec, expired}
