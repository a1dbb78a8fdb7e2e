-- claim: claims, or renews, one of active session ID's at most `max` long-lived responses for
-- a holder until one lease from now (one session, one stream; the rule is
-- MediaUse::claim_stream in store/src/media.rs). Lapsed claims are forgotten first.
-- KEYS[1] the tag hash of the id
-- ARGV: id (16 raw bytes), holder (8 raw bytes), max, lease ms, origin, channel
-- Reply: {'held' | 'full' | 'gone', streams in flight, expired}
local id, holder, max, lease = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local h, s, expired = active_by_id(id, now, ARGV[5], ARGV[6])
if not s then
  return {'gone', 0, expired}
end
local m = media_of(h, id, now)
local streams, mine = {}, nil
for _, e in ipairs(m.streams) do
  if e[2] > now then
    streams[#streams + 1] = e
    if e[1] == holder then
      mine = e
    end
  end
end
m.streams = streams
local outcome = 'held'
if mine then
  mine[2] = now + lease
elseif #streams < max then
  streams[#streams + 1] = {holder, now + lease}
else
  outcome = 'full'
end
put_media(h, id, m, now + lease)
return {outcome, #streams, expired}
