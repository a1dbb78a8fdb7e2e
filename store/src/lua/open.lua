-- open: opens the session of (account, stream), or renews it if active.
-- KEYS[1] A..'streams', KEYS[2] A..'age', KEYS[3] A..'exp', KEYS[4] A..'cut'
-- ARGV: P, A, account, stream, new id, limit, ttl ms, on-limit ('reject'|'evict'),
--       mode ('enforce'|'dryrun'), deadline (ms on this server's clock, 0: none), origin, channel
-- Reply: {'late', 0, expired}: the caller's deadline has passed (it has given up: answering
--        would take a slot nobody holds), nothing changed
--      | {'renewed', active count, session, expired}
--      | {'admitted', active count, session, evicted, dry run ('' | 'refuse' | 'evict'), expired}
--      | {'refused', active count, active sessions, expired}
local P, A, account, stream, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local limit, ttl, on_limit, mode = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], ARGV[9]
local deadline, origin, channel = tonumber(ARGV[10]), ARGV[11], ARGV[12]
local now = now_ms()
if deadline > 0 and now > deadline then
  return {'late', 0, {}}
end
local expired = expire_overdue(P, A, now, origin, channel)

local existing = redis.call('HGET', KEYS[1], stream)
if existing then
  local rec = renew(P, A, existing, now, ttl)
  return {'renewed', redis.call('ZCARD', KEYS[2]), rec, expired}
end

-- The rule of admission::decide, applied atomically.
local count = redis.call('ZCARD', KEYS[2])
local decision, evict, dry_run = decide(count, limit, on_limit, mode)
if decision == 'refuse' then
  return {'refused', count, active(P, A), expired}
end
if decision == 'dryrun' then
  evict = 0
end

local evicted = {}
if evict > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, evict - 1)
  for i = 1, #oldest do
    local rec = cut(P, A, oldest[i], 'evicted', now, now, origin, channel)
    if rec then
      evicted[#evicted + 1] = rec
    end
  end
end

insert(P, A, account, stream, id, now, now, ttl)
return {'admitted', redis.call('ZCARD', KEYS[2]), record(P, id), evicted, dry_run, expired}
