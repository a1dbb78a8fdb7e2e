-- open: opens the session of (account, stream), or renews it if active.
-- KEYS[1] the account's tag hash
-- ARGV: account, stream, new id (16 raw bytes), limit, ttl ms, on-limit ('reject'|'evict'),
--       mode ('enforce'|'dryrun'), deadline (ms on this server's clock, 0: none), origin, channel
-- Reply: {'late', 0, expired}: the caller's deadline has passed (it has given up: answering
--        would take a slot nobody holds), nothing changed
--      | {'renewed', active count, raw id, created, now, expired}
--      | {'admitted', active count, now, evicted, dry run ('' | 'refuse' | 'evict'), expired}
-- A renewed or admitted session is the caller's own (its account and stream, renewed for its TTL
-- from now, admitted with its id): only what the caller does not know is returned, which keeps
-- the reply, a good part of the call's cost, small.
--      | {'refused', active count, active sessions, expired}
local account, stream, id = ARGV[1], ARGV[2], ARGV[3]
local limit, ttl, on_limit, mode = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local deadline, origin, channel = tonumber(ARGV[8]), ARGV[9], ARGV[10]
local now = now_ms()
if deadline > 0 and now > deadline then
  return {'late', 0, {}}
end
local h = account_hash(KEYS[1], account)
local expired = expire_overdue(h, now, origin, channel)
local existing = active_of_stream(h, stream)
if existing then
  renew(h, existing, now, ttl)
  save(h)
  return {'renewed', count_active(h), existing.id, existing.created, now, expired}
end

-- The rule of admission::decide, applied atomically.
local count = count_active(h)
local decision, evict, dry_run = decide(count, limit, on_limit, mode)
if decision == 'refuse' then
  save(h)
  return {'refused', count, records(h, active(h)), expired}
end
if decision == 'dryrun' then
  evict = 0
end

local evicted = {}
local live = evict > 0 and active(h) or {}
for i = 1, math.min(evict, #live) do
  evicted[#evicted + 1] = cut(h, live[i], 'evicted', now, now, origin, channel)
end

local s = insert(h, id, stream, now, now, ttl)
save(h)
return {'admitted', count - #evicted + 1, now, evicted, dry_run, expired}
