-- Shared by every StreamGate script; each operation's script is this file followed by its body.
--
-- Key layout: one hash per account, nothing else.
--   K = 'sg{TTTTTTTT}' (TTTTTTTT: the account's tag in hex, derived by hashing the account id,
--   never chosen by a caller; the braces make it the Redis Cluster hash tag). Every session id
--   carries the tag too, so a look-up by id finds the hash without knowing the account.
--   K['@']        the account id (raw bytes)
--   K[ID]         one session per field, named by the 16 random bytes of its id (raw), holding
--                 struct '>c1I4i6i6I4' (state code, admission seq, created ms, expires ms,
--                 ttl ms) followed by the stream id (raw). State codes: 'a' active, 'e' revoked
--                 (evicted), 'k' revoked (kicked), 'd' revoked (denied), 's' revoked (shared),
--                 'x' expired. A cut session stays as a tombstone (its expires is the
--                 cut time) for one TTL, to answer 410.
--                 A session its player ended keeps its field for one TTL after the end as a
--                 marker, struct '>c1i6' ('n', until when in ms): it stops a write-back (adopt)
--                 of that id by a sidecar that admitted it without the store and may hold it
--                 still, and answers nothing else (an ended session is gone, not cut). Ending
--                 overwrites the session's field (no field added or deleted), and the marker
--                 costs about 25 bytes of the hash while it lasts.
--   K[ID .. '~']  the media use of active session ID, once it was used through a sidecar
--                 (sharing detection, one session one stream: store/src/media.rs): struct
--                 '>c1i6I1I1' ('n', until ms, networks, streams), then per network '>c8i6' (the
--                 network, last seen ms), then per stream '>c8i6' (the response holding the
--                 claim, claim lapses at ms). Deleted when the session stops being active (by
--                 the next call that saves the hash) or once `until` (when nothing in it
--                 matters any more) has passed. Its field name is 17 bytes, which is how it is
--                 told apart; it starts like an ended session's marker so that a sidecar of an
--                 earlier version, which knows no media use, takes it for one: kept until
--                 `until`, then deleted, never read as a session.
--   K['o']        only when other accounts share the tag (a 32-bit tag: about a hundred pairs
--                 among a million accounts): their hex ids, space-separated. Such an account
--                 lives in the hash K .. hex(account), same layout, same slot.
-- A hash of a few sessions stays a listpack (hash-max-listpack-entries, 128 by default: 127
-- sessions and tombstones), which is what keeps a session near 50 bytes. Every call reads the
-- whole hash of its account (HGETALL), so its cost grows with that account's sessions, never
-- with the store's. The key expires by itself (PEXPIREAT) when its last session or tombstone
-- stops mattering, and is deleted when it holds none, so nothing needs a global sweep.
--
-- "Now" is the Redis server's clock (TIME), never a sidecar's: skewed sidecars cannot over-admit
-- or expire sessions early. (Tests that move time by hand append the two ARGV '__now__', MS
-- after every script's own; every script's last two own ARGV are the sidecar's origin and the
-- channel, so no caller-supplied value can sit in that position.) Cuts (evicted, kicked,
-- expired) are published on the revocation channel as:
-- origin TAB id TAB account TAB stream TAB state TAB reason TAB created TAB expires TAB ttl
-- Sessions are returned to the caller as {raw id, account, stream, state, reason, created,
-- expires, ttl}.

-- The arguments of the running call (set by each function on entry; Redis runs one at a time).
local KEYS, ARGV

local FORMAT = '>c1I4i6i6I4'
local MARKER = '>c1i6'
local STATE = {a = 'active', e = 'revoked', k = 'revoked', d = 'revoked', s = 'revoked',
  x = 'expired'}
local REASON = {a = '', e = 'evicted', k = 'kicked', d = 'denied', s = 'shared', x = 'expired'}
local CODE = {evicted = 'e', kicked = 'k', denied = 'd', shared = 's', expired = 'x'}
local MEDIA_HEAD = '>c1i6I1I1'
local MEDIA_ENTRY = '>c8i6'
-- The empty list in replies. Nothing writes to it: a hash's optional parts (ended, media, dirty,
-- gone) are nil until it has some, and lists are made when their first entry comes, so the
-- common call allocates no empty tables (allocation and garbage collection are a good part of a
-- call's Lua time).
local EMPTY = {}

local function now_ms()
  if #ARGV >= 2 and ARGV[#ARGV - 1] == '__now__' then
    return tonumber(ARGV[#ARGV])
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function hex(s)
  return (string.gsub(s, '.', function(c) return string.format('%02x', string.byte(c)) end))
end

-- The account hash at key `k`: {key, account, over, sessions = {...}, ...}, from its fields
-- `flat` (HGETALL) when the caller has read them already.
local function load(k, flat)
  flat = flat or redis.call('HGETALL', k)
  -- Optional parts, nil until the hash has one: ended (id -> until ms), media (id -> value),
  -- dirty (changed sessions), gone (fields to delete).
  local h = {key = k, sessions = {}, account = false, new = false, dirty = false}
  for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    if f == '@' then
      h.account = v
    elseif f == 'o' then
      h.over = v
    elseif #f == 17 then -- a session's media use
      h.media = h.media or {}
      h.media[string.sub(f, 1, 16)] = v
    elseif string.byte(v) == 110 then -- 'n': an ended session's marker
      local _, until_ms = struct.unpack(MARKER, v)
      h.ended = h.ended or {}
      h.ended[f] = until_ms
    else
      local code, seq, created, expires, ttl, at = struct.unpack(FORMAT, v)
      h.sessions[#h.sessions + 1] = {id = f, code = code, seq = seq, created = created,
        expires = expires, ttl = ttl, stream = string.sub(v, at)}
    end
  end
  return h
end

-- The one session of hash fields `flat` (HGETALL), when they hold exactly the account's id and
-- that session, active and not yet due at `now`, and the account is `account` (any when nil):
-- its id, admission seq, created, expires, ttl and stream, and the account. Nil otherwise. This is the shape of
-- almost every account (one viewer, one stream), and the calls below answer it without loading
-- the hash into tables: what they write and answer is what the general path would.
local function only_session(flat, account, now)
  if #flat ~= 4 then
    return nil
  end
  local a, f, v
  if flat[1] == '@' then
    a, f, v = flat[2], flat[3], flat[4]
  elseif flat[3] == '@' then
    a, f, v = flat[4], flat[1], flat[2]
  else
    return nil
  end
  -- 'a' (97): an active session; a 16-byte field name: a session, not media use or a list.
  if (account and a ~= account) or #f ~= 16 or string.byte(v) ~= 97 then
    return nil
  end
  local _, seq, created, expires, ttl, at = struct.unpack(FORMAT, v)
  if expires <= now then
    return nil
  end
  return f, seq, created, expires, ttl, string.sub(v, at), a
end

-- Reply `r`, with the expired sessions' records appended when there are any (an empty list costs
-- the reply as much as several fields, and most calls expire nothing).
local function with_expired(r, expired)
  if expired ~= EMPTY then
    r[#r + 1] = expired
  end
  return r
end

-- The hash of `account`, whose tag hash is `main` (with fields `flat` when read already): `main`
-- itself unless another account holds it.
local function account_hash(main, account, flat)
  local h = load(main, flat)
  if not h.account or h.account == account then
    h.account = h.account or account
    h.new = #h.sessions == 0
    return h
  end
  local o = load(main .. hex(account))
  o.account = account
  o.new = #o.sessions == 0
  o.main, o.main_over = main, h.over
  return o
end

-- The hash holding session `id` and the session, or nil (`flat`: the fields of `main` when read
-- already).
local function find(main, id, flat)
  local h = load(main, flat)
  for i = 1, #h.sessions do
    local s = h.sessions[i]
    if s.id == id then
      return h, s
    end
  end
  for suffix in string.gmatch(h.over or '', '%S+') do
    local o = load(main .. suffix)
    o.main, o.main_over = main, h.over
    for i = 1, #o.sessions do
      local s = o.sessions[i]
      if s.id == id then
        return o, s
      end
    end
  end
  return nil, nil
end

-- A session's field value.
local function pack_session(code, seq, created, expires, ttl, stream)
  return struct.pack(FORMAT, code, seq, created, expires, ttl) .. stream
end

-- Renews the one session of hash `key` (found by only_session) for `ttl` ms from `now`: its
-- field, and the key's expiry (the session's plus one TTL), as save() would.
local function renew_only(key, id, seq, created, stream, now, ttl)
  redis.call('HSET', key, id, pack_session('a', seq, created, now + ttl, ttl, stream))
  redis.call('PEXPIREAT', key, now + 2 * ttl)
end

-- When the session of (account, stream) is its hash's only one (only_session): renews it for
-- `ttl` ms from `now` and returns the answer of a renewal. Nil otherwise.
local function renew_if_only(flat, account, stream, now, ttl)
  local id, seq, created, _, _, own_stream = only_session(flat, account, now)
  if id and own_stream == stream then
    renew_only(KEYS[1], id, seq, created, stream, now, ttl)
    return {'renewed', 1, id, created, now}
  end
  return nil
end

local function record(h, s)
  return {s.id, h.account, s.stream, STATE[s.code], REASON[s.code], s.created, s.expires, s.ttl}
end

-- `s` if it is still answerable at `now`: active, or cut less than its TTL ago.
local function answerable(s, now)
  if s and not s.removed and (s.code == 'a' or s.expires + s.ttl > now) then
    return s
  end
  return nil
end

-- Appends `v` to `h`'s list `name`, made with its first entry.
local function push(h, name, v)
  local list = h[name]
  if list then
    list[#list + 1] = v
  else
    h[name] = {v}
  end
end

local function touched(h, s)
  push(h, 'dirty', s)
end

-- Deletes field `f` of `h` when it is saved.
local function forget(h, f)
  push(h, 'gone', f)
end

local function remove(h, s)
  s.removed = true
  forget(h, s.id)
end

-- Removes active session `s`, which its player ended, and marks its id ended until one TTL
-- from `now`.
local function mark_ended(h, s, now)
  -- Removed from the sessions, but its field is overwritten by the marker, not deleted.
  s.removed = true
  h.ended = h.ended or {}
  h.ended[s.id] = now + s.ttl
  h.marked = s.id
end

local function publish(channel, origin, h, s, tag)
  redis.call('PUBLISH', channel, table.concat({origin, hex(s.id) .. tag, h.account, s.stream,
    STATE[s.code], REASON[s.code], string.format('%d', s.created),
    string.format('%d', s.expires), string.format('%d', s.ttl)}, '\t'))
end

-- Turns active session `s` into a tombstone that answers for one TTL after `at`, announces it
-- and returns its record.
local function cut(h, s, reason, at, now, origin, channel)
  s.code = CODE[reason]
  s.expires = at
  if at + s.ttl <= now then
    -- Noticed only after its tombstone time ran out too: forget it at once, as if on time.
    remove(h, s)
  else
    touched(h, s)
  end
  publish(channel, origin, h, s, string.sub(KEYS[1], 4, 11))
  return record(h, s)
end

-- Expires the account's overdue sessions and forgets tombstones and ended markers past their
-- time. Returns the expired sessions' records.
local function expire_overdue(h, now, origin, channel)
  local ended = h.ended
  if ended then
    for id, until_ms in pairs(ended) do
      if until_ms <= now then
        ended[id] = nil
        forget(h, id)
      end
    end
  end
  local expired
  for i = 1, #h.sessions do
    local s = h.sessions[i]
    if s.code == 'a' then
      if s.expires <= now then
        expired = expired or {}
        expired[#expired + 1] = cut(h, s, 'expired', s.expires, now, origin, channel)
      end
    elseif s.expires + s.ttl <= now then
      remove(h, s)
    end
  end
  return expired or EMPTY
end

-- The account's active sessions, oldest first (by creation, then admission order).
local function active(h)
  local out = {}
  for i = 1, #h.sessions do
    local s = h.sessions[i]
    if s.code == 'a' and not s.removed then
      out[#out + 1] = s
    end
  end
  table.sort(out, function(x, y)
    if x.created ~= y.created then
      return x.created < y.created
    end
    return x.seq < y.seq
  end)
  return out
end

local function count_active(h)
  local n = 0
  for i = 1, #h.sessions do
    local s = h.sessions[i]
    if s.code == 'a' and not s.removed then
      n = n + 1
    end
  end
  return n
end

local function active_of_stream(h, stream)
  for i = 1, #h.sessions do
    local s = h.sessions[i]
    if s.code == 'a' and not s.removed and s.stream == stream then
      return s
    end
  end
  return nil
end

-- Renews active session `s` for `ttl` ms from `now`.
local function renew(h, s, now, ttl)
  s.expires = now + ttl
  s.ttl = ttl
  touched(h, s)
end

-- Adds a new active session.
local function insert(h, id, stream, created, now, ttl)
  local seq = 0
  for i = 1, #h.sessions do
    local s = h.sessions[i]
    if s.seq > seq then
      seq = s.seq
    end
  end
  local s = {id = id, code = 'a', seq = (seq + 1) % 4294967296, created = created,
    expires = now + ttl, ttl = ttl, stream = stream}
  h.sessions[#h.sessions + 1] = s
  touched(h, s)
  return s
end

local function hset(key, args)
  -- unpack() is bounded by the Lua stack: write in slices.
  for i = 1, #args, 1000 do
    redis.call('HSET', key, unpack(args, i, math.min(i + 999, #args)))
  end
end

-- Writes back what changed in `h`, and sets the key to expire when its last session or
-- tombstone stops mattering (or deletes it when it holds none).
local function save(h)
  if not h.dirty and not h.gone and not h.marked then
    return
  end
  if h.media then
    -- Media use lasts only while its session is active.
    local live = {}
    for i = 1, #h.sessions do
      local s = h.sessions[i]
      if s.code == 'a' and not s.removed then
        live[s.id] = true
      end
    end
    for id in pairs(h.media) do
      if not live[id] then
        h.media[id] = nil
        forget(h, id .. '~')
      end
    end
  end
  local until_ms, left = 0, 0
  for i = 1, #h.sessions do
    local s = h.sessions[i]
    if not s.removed then
      left = left + 1
      if s.expires + s.ttl > until_ms then
        until_ms = s.expires + s.ttl
      end
    end
  end
  for _, marker_until in pairs(h.ended or EMPTY) do
    left = left + 1
    if marker_until > until_ms then
      until_ms = marker_until
    end
  end
  if left == 0 and h.over == nil then
    redis.call('DEL', h.key)
    if h.main then
      -- An overflow hash: drop it from its tag hash's list.
      local suffix = string.sub(h.key, #h.main + 1)
      local rest = {}
      for other in string.gmatch(h.main_over or '', '%S+') do
        if other ~= suffix then
          rest[#rest + 1] = other
        end
      end
      if #rest == 0 then
        redis.call('HDEL', h.main, 'o')
      else
        redis.call('HSET', h.main, 'o', table.concat(rest, ' '))
      end
    end
    return
  end
  local gone = h.gone
  if gone then
    for i = 1, #gone, 1000 do
      redis.call('HDEL', h.key, unpack(gone, i, math.min(i + 999, #gone)))
    end
  end
  local args
  if h.new then
    args = {'@', h.account}
  else
    args = {}
  end
  local dirty = h.dirty or EMPTY
  for i = 1, #dirty do
    local s = dirty[i]
    if not s.removed then
      args[#args + 1] = s.id
      args[#args + 1] = pack_session(s.code, s.seq, s.created, s.expires, s.ttl, s.stream)
    end
  end
  if h.marked then
    args[#args + 1] = h.marked
    args[#args + 1] = struct.pack(MARKER, 'n', h.ended[h.marked])
  end
  if #args > 0 then
    hset(h.key, args)
  end
  if until_ms > 0 then
    redis.call('PEXPIREAT', h.key, until_ms)
  end
  if h.main then
    if h.new then
      local listed = false
      for other in string.gmatch(h.main_over or '', '%S+') do
        listed = listed or other == string.sub(h.key, #h.main + 1)
      end
      if not listed then
        local list = string.sub(h.key, #h.main + 1)
        if h.main_over then
          list = h.main_over .. ' ' .. list
        end
        redis.call('HSET', h.main, 'o', list)
      end
    end
    -- The tag hash lists this one, so it must last at least as long.
    redis.call('PEXPIREAT', h.main, until_ms, 'GT')
  end
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

local function records(h, list)
  local out = {}
  for i, s in ipairs(list) do
    out[i] = record(h, s)
  end
  return out
end

-- The media use of session `id` in `h` at `now`: {networks = {{network, seen}...}, streams =
-- {{holder, until}...}, until = ms}, empty when none is recorded or all of it is past.
local function media_of(h, id, now)
  local m = {networks = {}, streams = {}, until_ms = 0}
  local v = h.media and h.media[id]
  if v == nil then
    return m
  end
  local _, until_ms, networks, streams, at = struct.unpack(MEDIA_HEAD, v)
  if until_ms <= now then
    return m
  end
  m.until_ms = until_ms
  for i = 1, networks do
    local network, seen
    network, seen, at = struct.unpack(MEDIA_ENTRY, v, at)
    m.networks[i] = {network, seen}
  end
  for i = 1, streams do
    local holder, until_ms
    holder, until_ms, at = struct.unpack(MEDIA_ENTRY, v, at)
    m.streams[i] = {holder, until_ms}
  end
  return m
end

-- Writes session `id`'s media use `m`, which matters until `until_ms` at least (deletes it
-- when empty).
local function put_media(h, id, m, until_ms)
  if #m.networks == 0 and #m.streams == 0 then
    if h.media and h.media[id] ~= nil then
      h.media[id] = nil
      redis.call('HDEL', h.key, id .. '~')
    end
    return
  end
  if until_ms < m.until_ms then
    until_ms = m.until_ms
  end
  local parts = {struct.pack(MEDIA_HEAD, 'n', until_ms, #m.networks, #m.streams)}
  for _, e in ipairs(m.networks) do
    parts[#parts + 1] = struct.pack(MEDIA_ENTRY, e[1], e[2])
  end
  for _, e in ipairs(m.streams) do
    parts[#parts + 1] = struct.pack(MEDIA_ENTRY, e[1], e[2])
  end
  local v = table.concat(parts)
  h.media = h.media or {}
  h.media[id] = v
  redis.call('HSET', h.key, id .. '~', v)
end

-- Active session `id` (found by `find`) at `now`, after expiring its account's overdue
-- sessions: the hash, the session (nil when it is not active) and the expired sessions.
local function active_by_id(id, now, origin, channel)
  local h, s = find(KEYS[1], id)
  if not h then
    return nil, nil, EMPTY
  end
  local expired = expire_overdue(h, now, origin, channel)
  save(h)
  if not s or s.removed or s.code ~= 'a' then
    return h, nil, expired
  end
  return h, s, expired
end
