-- touch: a media request's look-up by session id. Renews an active session whose last renewal
-- (expires - ttl) is at least `renew after` ms old: the implicit heartbeat of a playing viewer.
-- KEYS[1] the tag hash of the id
-- ARGV: id (16 raw bytes), ttl ms, renew after ms, origin, channel
-- Reply: {renewed (0 | 1), account, stream, state, reason, created, expires, ttl[, expired]}: the
--        session, active or cut within its TTL (the caller knows its id)
--      | {0, false[, expired]}: no such session
-- (expired: the sessions this call found overdue, only when there are any)
-- The answer for session `s` of hash `h`.
local function found(h, s, renewed)
  return {renewed, h.account, s.stream, STATE[s.code], REASON[s.code], s.created, s.expires, s.ttl}
end

local id, ttl, renew_after = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local origin, channel = ARGV[4], ARGV[5]
local now = now_ms()
local flat = redis.call('HGETALL', KEYS[1])
local own, seq, created, expires, own_ttl, stream, account = only_session(flat, nil, now)
if own == id then
  -- The only session of its hash.
  if now - (expires - own_ttl) >= renew_after then
    renew_only(KEYS[1], id, seq, created, stream, now, ttl)
    return {1, account, stream, 'active', '', created, now + ttl, ttl}
  end
  return {0, account, stream, 'active', '', created, expires, own_ttl}
end
local h, s = find(KEYS[1], id, flat)
if not h then
  return {0, false}
end
local expired = expire_overdue(h, now, origin, channel)
if not answerable(s, now) then
  save(h)
  return with_expired({0, false}, expired)
end
if s.code == 'a' and now - (s.expires - s.ttl) >= renew_after then
  renew(h, s, now, ttl)
  save(h)
  return with_expired(found(h, s, 1), expired)
end
save(h)
return with_expired(found(h, s, 0), expired)
