-- release: drops a holder's claim on session ID's streams (its response ended).
-- KEYS[1] the tag hash of the id
-- ARGV: id (16 raw bytes), holder (8 raw bytes)
-- Reply: 1
local id, holder = ARGV[1], ARGV[2]
local h = find(KEYS[1], id)
if not h or not h.media or h.media[id] == nil then
  return 1
end
local m = media_of(h, id, now_ms())
local streams = {}
for _, e in ipairs(m.streams) do
  if e[1] ~= holder then
    streams[#streams + 1] = e
  end
end
m.streams = streams
put_media(h, id, m, 0)
return 1
