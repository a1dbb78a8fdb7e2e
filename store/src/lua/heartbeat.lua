-- heartbeat: renews the active session of (account, stream).
-- KEYS[1] the account's tag hash
-- ARGV: account, stream, ttl ms, origin, channel
-- Reply: {'renewed', active count, raw id, created, now[, expired]} (the caller knows the rest of
--        its session: as open's) | {'gone', 0, session[, expired]}
--      | {'notfound', 0, false[, expired]}
-- (expired: the sessions this call found overdue, only when there are any.)
local account, stream, ttl, origin, channel = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local now = now_ms()
local flat = redis.call('HGETALL', KEYS[1])
local renewed = renew_if_only(flat, account, stream, now, ttl)
if renewed then
  return renewed
end
local h = account_hash(KEYS[1], account, flat)
local expired = expire_overdue(h, now, origin, channel)
local s = active_of_stream(h, stream)
if s then
  renew(h, s, now, ttl)
  save(h)
  return with_expired({'renewed', count_active(h), s.id, s.created, now}, expired)
end
save(h)
-- The stream's most recently cut session, while it answers. A stream has one active session at a
-- time, so the one admitted last (highest seq) was cut last.
local last
for _, t in ipairs(h.sessions) do
  if t.code ~= 'a' and not t.removed and t.stream == stream and (last == nil or t.seq > last.seq) then
    last = t
  end
end
if answerable(last, now) then
  return with_expired({'gone', 0, record(h, last)}, expired)
end
return with_expired({'notfound', 0, false}, expired)
