-- open: opens the session of (account, stream), or renews it if active.
-- KEYS[1] the account's tag hash
-- ARGV: account, stream, new id (16 raw bytes), limit, ttl ms, on-limit ('reject'|'evict'),
--       mode ('enforce'|'dryrun'), deadline (ms on this server's clock, 0: none), origin, channel
-- Reply: now (an integer): the account's first session was admitted with the caller's id (active
--        count 1, nothing evicted or expired)
--      | {'late', 0}: the caller's deadline has passed (it has given up: answering would take a
--        slot nobody holds), nothing changed
--      | {'renewed', active count, raw id, created, now[, expired]}
--      | {'admitted', active count, now, evicted, dry run ('' | 'refuse' | 'evict')[, expired]}
--      | {'refused', active count, active sessions[, expired]}
-- A renewed or admitted session is the caller's own (its account and stream, renewed for its TTL
-- from now, admitted with its id): only what the caller does not know is returned, which keeps
-- the reply, a good part of the call's cost, small. (expired: the sessions this call found
-- overdue, only when there are any.)
local account, stream, id = ARGV[1], ARGV[2], ARGV[3]
local limit, ttl, on_limit, mode = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local deadline, origin, channel = tonumber(ARGV[8]), ARGV[9], ARGV[10]
local now = now_ms()
if deadline > 0 and now > deadline then
  return {'late', 0}
end
local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 and limit > 0 then
  -- The account's first session, on an empty hash (the common admission): nothing to expire,
  -- renew or evict. The general path below gives the same answer and writes the same fields,
  -- with a good part of the call's Lua time spent on finding that out.
  redis.call('HSET', KEYS[1], '@', account, id, pack_session('a', 1, now, now + ttl, ttl, stream))
  redis.call('PEXPIREAT', KEYS[1], now + 2 * ttl)
  return now
end
-- The account's only session is this stream's: renewed, as a heartbeat would.
local renewed = renew_if_only(flat, account, stream, now, ttl)
if renewed then
  return renewed
end
local h = account_hash(KEYS[1], account, flat)
local expired = expire_overdue(h, now, origin, channel)
local existing = active_of_stream(h, stream)
if existing then
  renew(h, existing, now, ttl)
  save(h)
  return with_expired({'renewed', count_active(h), existing.id, existing.created, now}, expired)
end

-- The rule of admission::decide, applied atomically.
local count = count_active(h)
local decision, evict, dry_run = decide(count, limit, on_limit, mode)
if decision == 'refuse' then
  save(h)
  return with_expired({'refused', count, records(h, active(h))}, expired)
end
if decision == 'dryrun' then
  evict = 0
end

local evicted = EMPTY
if evict > 0 then
  evicted = {}
  local live = active(h)
  for i = 1, math.min(evict, #live) do
    evicted[#evicted + 1] = cut(h, live[i], 'evicted', now, now, origin, channel)
  end
end

local s = insert(h, id, stream, now, now, ttl)
save(h)
return with_expired({'admitted', count - #evicted + 1, now, evicted, dry_run}, expired)
