-- open: opens the session of (account, stream), or renews it if active.
-- KEYS[1] A..'streams', KEYS[2] A..'age', KEYS[3] A..'exp', KEYS[4] A..'cut'
-- ARGV: P, A, account, stream, new id, limit, ttl ms, on-limit ('reject'|'evict'),
--       mode ('enforce'|'dryrun'), origin, channel
-- Reply: {'renewed', active count, session, expired}
--      | {'admitted', active count, session, evicted, dry run ('' | 'refuse' | 'evict'), expired}
--      | {'refused', active count, active sessions, expired}
local P, A, account, stream, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local limit, ttl, on_limit, mode = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], ARGV[9]
local origin, channel = ARGV[10], ARGV[11]
local now = now_ms()
local expired = expire_overdue(P, A, now, origin, channel)

local existing = redis.call('HGET', KEYS[1], stream)
if existing then
  local rec = renew(P, A, existing, now, ttl)
  return {'renewed', redis.call('ZCARD', KEYS[2]), rec, expired}
end

-- The rule of admission::decide, applied atomically.
local count = redis.call('ZCARD', KEYS[2])
local evict, dry_run = 0, ''
if count >= limit then
  if mode == 'dryrun' then
    dry_run = (on_limit == 'evict') and 'evict' or 'refuse'
  elseif on_limit == 'reject' then
    return {'refused', count, active(P, A), expired}
  else
    evict = count + 1 - limit
  end
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

local skey = P .. 's:' .. id
local expires = now + ttl
redis.call('HSET', skey, 'account', account, 'stream', stream, 'state', 'active', 'reason', '',
  'created', now, 'expires', expires, 'ttl', ttl, 'akey', A)
redis.call('PEXPIREAT', skey, expires + ttl)
redis.call('HSET', KEYS[1], stream, id)
local seq = redis.call('INCR', A .. 'seq') % 1000
redis.call('ZADD', KEYS[2], now * 1000 + seq, id)
redis.call('ZADD', KEYS[3], expires, id)
keep(KEYS[1], expires + ttl)
keep(KEYS[2], expires + ttl)
keep(KEYS[3], expires + ttl)
keep(A .. 'seq', expires + ttl)
return {'admitted', redis.call('ZCARD', KEYS[2]), record(P, id), evicted, dry_run, expired}
