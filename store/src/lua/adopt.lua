-- adopt: writes back a session a sidecar admitted without the store (failurePolicy Open during
-- an outage), keeping its id and creation time, renewed from now. It was admitted already, so
-- the limit is not applied again; if its stream has another active session by now, that one wins;
-- if its player ended it (through another sidecar) within its TTL, it stays ended.
-- KEYS[1] the account's tag hash
-- ARGV: account, stream, id (16 raw bytes), created ms, ttl ms, origin, channel
-- Reply: {'adopted' | 'present' | 'taken' | 'ended', expired}
local account, stream, id = ARGV[1], ARGV[2], ARGV[3]
local created, ttl, origin, channel = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local now = now_ms()
local h = account_hash(KEYS[1], account)
local expired = expire_overdue(h, now, origin, channel)
for _, s in ipairs(h.sessions) do
  if s.id == id and not s.removed then
    save(h)
    return {'present', expired}
  end
end
if h.ended and h.ended[id] then
  save(h)
  return {'ended', expired}
end
if active_of_stream(h, stream) then
  save(h)
  return {'taken', expired}
end
insert(h, id, stream, created, now, ttl)
save(h)
return {'adopted', expired}
