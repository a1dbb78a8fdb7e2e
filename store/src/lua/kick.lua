-- kick: revokes an active session for a reason ('kicked' by an admin, 'shared' by sharing
-- detection, 'denied' by a session validator).
-- KEYS[1] the tag hash of the id
-- ARGV: id (16 raw bytes), reason, origin, channel
-- Reply: {'kicked', session, expired} | {'gone', session, expired} | {'notfound', false, expired}
local id, reason, origin, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local h, s = find(KEYS[1], id)
if not h then
  return {'notfound', false, EMPTY}
end
local now = now_ms()
local expired = expire_overdue(h, now, origin, channel)
if not answerable(s, now) then
  save(h)
  return {'notfound', false, expired}
end
if s.code ~= 'a' then
  save(h)
  return {'gone', record(h, s), expired}
end
local rec = cut(h, s, reason, now, now, origin, channel)
save(h)
return {'kicked', rec, expired}
