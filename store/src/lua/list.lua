-- list: the account's active sessions, oldest first.
-- KEYS[1] the account's tag hash
-- ARGV: account, origin, channel
-- Reply: {sessions, expired}
local account, origin, channel = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local h = account_hash(KEYS[1], account)
local expired = expire_overdue(h, now, origin, channel)
save(h)
return {records(h, active(h)), expired}
