-- adopt: writes back a session a sidecar admitted without the store (failurePolicy Open during
-- an outage), keeping its id and creation time, renewed from now. It was admitted already, so
-- the limit is not applied again; if its stream has another active session by now, that one wins;
-- if its player ended it (through another sidecar) within its TTL, it stays ended.
-- KEYS[1] A..'streams', KEYS[2] A..'age', KEYS[3] A..'exp', KEYS[4] A..'cut'
-- ARGV: P, A, account, stream, id, created ms, ttl ms, origin, channel
-- Reply: {'adopted' | 'present' | 'taken' | 'ended', expired}
local P, A, account, stream, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local created, ttl, origin, channel = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], ARGV[9]
local now = now_ms()
local expired = expire_overdue(P, A, now, origin, channel)
if redis.call('EXISTS', P .. 's:' .. id) == 1 then
  return {'present', expired}
end
local ended_until = redis.call('GET', P .. 'e:' .. id)
if ended_until and tonumber(ended_until) > now then
  return {'ended', expired}
end
if redis.call('HGET', KEYS[1], stream) then
  return {'taken', expired}
end
insert(P, A, account, stream, id, created, now, ttl)
return {'adopted', expired}
