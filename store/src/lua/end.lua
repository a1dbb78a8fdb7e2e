-- end: ends the active session of (account, stream). An ended session leaves no tombstone to
-- answer for, only a marker that stops a write-back of it (adopt) for one TTL: another sidecar
-- may hold it as a degraded admission whose id the store admitted after all.
-- KEYS[1] the account's tag hash
-- ARGV: account, stream, origin, channel
-- Reply: {'ended', session, expired} | {'none', false, expired}
local account, stream, origin, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
local h = account_hash(KEYS[1], account)
local expired = expire_overdue(h, now, origin, channel)
local s = active_of_stream(h, stream)
if not s then
  save(h)
  return {'none', false, expired}
end
mark_ended(h, s, now)
save(h)
return {'ended', record(h, s), expired}
