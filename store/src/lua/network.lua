-- network: records that active session ID was used from a client network (sharing detection;
-- the rule is MediaUse::note_network in store/src/media.rs). Forgets networks not seen within
-- the window and keeps at most `keep`, the most recent.
-- KEYS[1] the tag hash of the id
-- ARGV: id (16 raw bytes), network (8 raw bytes), window ms, keep, origin, channel
-- Reply: {distinct networks within the window (this one included) or false when the session is
-- not active, expired}
local id, network, window, keep = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local h, s, expired = active_by_id(id, now, ARGV[5], ARGV[6])
if not s then
  return {false, expired}
end
local m = media_of(h, id, now)
table.sort(m.networks, function(x, y) return x[2] > y[2] end)
local kept = {{network, now}}
for _, e in ipairs(m.networks) do
  if #kept >= keep then
    break
  end
  if e[1] ~= network and e[2] > now - window then
    kept[#kept + 1] = e
  end
end
m.networks = kept
put_media(h, id, m, now + window)
return {#kept, expired}
