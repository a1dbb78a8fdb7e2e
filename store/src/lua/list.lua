-- list: the account's active sessions, oldest first.
-- KEYS[1] A..'streams', KEYS[2] A..'age', KEYS[3] A..'exp', KEYS[4] A..'cut'
-- ARGV: P, A, origin, channel
-- Reply: {sessions, expired}
local P, A, origin, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
local expired = expire_overdue(P, A, now, origin, channel)
return {active(P, A), expired}
