-- Shared by every StreamGate script; each operation's script is this file followed by its body.
--
-- Key layout. P is the account's tag prefix `sg:{TTTTTTTT}:` (TTTTTTTT: the account tag in hex,
-- derived by hashing the account id, never chosen by a caller). A is the account prefix
-- P .. 'a:' .. hex(account) .. ':' (hex, so `{`, `}` and `:` in an account id cannot steer the
-- Redis Cluster slot or collide with another account's keys).
--   A..'streams'  HASH  streamId -> sessionId of its active session
--   A..'age'      ZSET  sessionId -> createdAt (ms) * 1000 + A..'seq' mod 1000: admission
--                       order, for EvictOldest, exact even within one millisecond
--   A..'seq'      STRING admission counter of the account
--   A..'exp'      ZSET  sessionId -> expiresAt (ms): finds overdue sessions without a scan
--   A..'cut'      HASH  streamId -> sessionId most recently cut, so a heartbeat can answer 410
--   P..'s:'..id   HASH  the session: account, stream, state, reason, created, expires, ttl, akey
--   P..'e:'..id   STRING until when (ms) a session its player ended stays ended (one TTL), so a
--                       sidecar that admitted it without the store (and may hold it still)
--                       cannot write it back
-- Every key of an account and of its sessions carries the tag, so a script touches one slot even
-- where it builds session keys from ids it reads. Keys expire by themselves (PEXPIREAT) one TTL
-- after they stop mattering, so nothing needs a global sweep.
--
-- "Now" is the Redis server's clock (TIME), never a sidecar's: skewed sidecars cannot over-admit
-- or expire sessions early. (Tests that move time by hand append the two ARGV '__now__', MS
-- after every script's own; every script's last two own ARGV are the sidecar's origin and the
-- channel, so no caller-supplied value can sit in that position.) Cuts (evicted, kicked,
-- expired) are published on the revocation channel as:
-- origin TAB id TAB account TAB stream TAB state TAB reason TAB created TAB expires TAB ttl

local function now_ms()
  if #ARGV >= 2 and ARGV[#ARGV - 1] == '__now__' then
    return tonumber(ARGV[#ARGV])
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A session as a reply: {id, account, stream, state, reason, created, expires, ttl}, or false.
local function record(P, id)
  local f = redis.call('HMGET', P .. 's:' .. id,
    'account', 'stream', 'state', 'reason', 'created', 'expires', 'ttl')
  if not f[1] then
    return false
  end
  return {id, f[1], f[2], f[3], f[4] or '', tonumber(f[5]), tonumber(f[6]), tonumber(f[7])}
end

-- `rec` if it is still answerable at `now`: active, or cut less than its TTL ago. (Its hash
-- expires by itself then too; this check makes the answer exact whenever Redis gets to it.)
local function answerable(rec, now)
  if rec and (rec[4] == 'active' or rec[7] + rec[8] > now) then
    return rec
  end
  return false
end

-- Keeps `key` until at least `until_ms` (PEXPIRETIME: -1 no expiry, -2 no key).
local function keep(key, until_ms)
  local at = redis.call('PEXPIRETIME', key)
  if at == -1 or (at >= 0 and at < until_ms) then
    redis.call('PEXPIREAT', key, until_ms)
  end
end

local function publish(channel, origin, rec)
  redis.call('PUBLISH', channel, table.concat({origin, rec[1], rec[2], rec[3], rec[4], rec[5],
    string.format('%d', rec[6]), string.format('%d', rec[7]), string.format('%d', rec[8])}, '\t'))
end

-- Turns active session `id` into a tombstone that answers for one TTL after `at`.
-- Returns the cut session.
local function cut(P, A, id, reason, at, now, origin, channel)
  local skey = P .. 's:' .. id
  if redis.call('EXISTS', skey) == 0 then
    -- Its hash already expired (nobody touched the account for a whole tombstone time): drop
    -- what still points at it. Nothing to answer for, nothing to announce.
    redis.call('ZREM', A .. 'age', id)
    redis.call('ZREM', A .. 'exp', id)
    local streams = redis.call('HGETALL', A .. 'streams')
    for i = 1, #streams, 2 do
      if streams[i + 1] == id then
        redis.call('HDEL', A .. 'streams', streams[i])
      end
    end
    return false
  end
  local state = 'revoked'
  if reason == 'expired' then
    state = 'expired'
  end
  redis.call('HSET', skey, 'state', state, 'reason', reason, 'expires', at)
  local rec = record(P, id)
  local stream = rec[3]
  if redis.call('HGET', A .. 'streams', stream) == id then
    redis.call('HDEL', A .. 'streams', stream)
  end
  redis.call('ZREM', A .. 'age', id)
  redis.call('ZREM', A .. 'exp', id)
  local gone_at = at + rec[8]
  if gone_at <= now then
    -- Noticed only after its tombstone time ran out too: forget it at once, as if on time.
    redis.call('DEL', skey)
  else
    redis.call('PEXPIREAT', skey, gone_at)
    redis.call('HSET', A .. 'cut', stream, id)
    keep(A .. 'cut', gone_at)
  end
  publish(channel, origin, rec)
  return rec
end

-- Expires the account's overdue sessions. Returns them.
local function expire_overdue(P, A, now, origin, channel)
  local overdue = redis.call('ZRANGEBYSCORE', A .. 'exp', '-inf', now, 'WITHSCORES')
  local expired = {}
  for i = 1, #overdue, 2 do
    local rec = cut(P, A, overdue[i], 'expired', tonumber(overdue[i + 1]), now, origin, channel)
    if rec then
      expired[#expired + 1] = rec
    end
  end
  return expired
end

-- Renews active session `id` for `ttl` ms. Returns it.
local function renew(P, A, id, now, ttl)
  local skey = P .. 's:' .. id
  local expires = now + ttl
  redis.call('HSET', skey, 'expires', expires, 'ttl', ttl)
  redis.call('PEXPIREAT', skey, expires + ttl)
  redis.call('ZADD', A .. 'exp', expires, id)
  keep(A .. 'streams', expires + ttl)
  keep(A .. 'age', expires + ttl)
  keep(A .. 'exp', expires + ttl)
  return record(P, id)
end

-- The account's active sessions, oldest first.
local function active(P, A)
  local ids = redis.call('ZRANGE', A .. 'age', 0, -1)
  local out = {}
  for i = 1, #ids do
    out[#out + 1] = record(P, ids[i])
  end
  return out
end

-- The admission rule (admission::decide in Rust; both are tested against one decision table).
-- Returns the decision ('admit' | 'evict' | 'refuse' | 'dryrun'), how many of the oldest to
-- evict, and for 'dryrun' what enforcement would have done ('refuse' | 'evict').
local function decide(count, limit, on_limit, mode)
  if count < limit then
    return 'admit', 0, ''
  end
  local would = 'refuse'
  local evict = 0
  if on_limit == 'evict' then
    would = 'evict'
    evict = count + 1 - limit
  end
  if mode == 'dryrun' then
    return 'dryrun', evict, would
  end
  return would, evict, ''
end

-- Stores a new active session created at `created`, expiring `ttl` ms after `now`.
local function insert(P, A, account, stream, id, created, now, ttl)
  local skey = P .. 's:' .. id
  local expires = now + ttl
  redis.call('HSET', skey, 'account', account, 'stream', stream, 'state', 'active', 'reason', '',
    'created', created, 'expires', expires, 'ttl', ttl, 'akey', A)
  redis.call('PEXPIREAT', skey, expires + ttl)
  redis.call('HSET', A .. 'streams', stream, id)
  local seq = redis.call('INCR', A .. 'seq') % 1000
  redis.call('ZADD', A .. 'age', created * 1000 + seq, id)
  redis.call('ZADD', A .. 'exp', expires, id)
  keep(A .. 'streams', expires + ttl)
  keep(A .. 'age', expires + ttl)
  keep(A .. 'exp', expires + ttl)
  keep(A .. 'seq', expires + ttl)
end
