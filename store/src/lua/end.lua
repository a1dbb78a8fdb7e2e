-- end: ends the active session of (account, stream). An ended session leaves no tombstone to
-- answer for, only a marker that stops a write-back of it (adopt) for one TTL: another sidecar
-- may hold it as a degraded admission whose id the store admitted after all.
-- KEYS[1] the account's tag hash
-- ARGV: account, stream, origin, channel
-- Reply: {'ended', raw id, created, expires, ttl[, expired]} (the session as it was, active:
--        the caller knows its account and stream) | {'none', false[, expired]}
-- (expired: the sessions this call found overdue, only when there are any.)
local account, stream, origin, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
local flat = redis.call('HGETALL', KEYS[1])
local id, _, created, expires, ttl, own_stream = only_session(flat, account, now)
if id and own_stream == stream then
  -- The account's only session: its field becomes the ended marker, which is all the hash then
  -- holds that matters, until one TTL from now.
  redis.call('HSET', KEYS[1], id, struct.pack(MARKER, 'n', now + ttl))
  redis.call('PEXPIREAT', KEYS[1], now + ttl)
  return {'ended', id, created, expires, ttl}
end
local h = account_hash(KEYS[1], account, flat)
local expired = expire_overdue(h, now, origin, channel)
local s = active_of_stream(h, stream)
if not s then
  save(h)
  return with_expired({'none', false}, expired)
end
mark_ended(h, s, now)
save(h)
return with_expired({'ended', s.id, s.created, s.expires, s.ttl}, expired)
