-- touch: a media request's look-up by session id. Renews an active session whose last renewal
-- (expires - ttl) is at least `renew after` ms old: the implicit heartbeat of a playing viewer.
-- KEYS[1] the tag hash of the id
-- ARGV: id (16 raw bytes), ttl ms, renew after ms, origin, channel
-- Reply: {session or false, renewed (0 | 1), expired}
local id, ttl, renew_after = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local origin, channel = ARGV[4], ARGV[5]
local h, s = find(KEYS[1], id)
if not h then
  return {false, 0, {}}
end
local now = now_ms()
local expired = expire_overdue(h, now, origin, channel)
if not answerable(s, now) then
  save(h)
  return {false, 0, expired}
end
if s.code == 'a' and now - (s.expires - s.ttl) >= renew_after then
  renew(h, s, now, ttl)
  save(h)
  return {record(h, s), 1, expired}
end
save(h)
return {record(h, s), 0, expired}
