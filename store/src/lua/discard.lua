-- discard: removes a session admitted by an open whose caller gave up (it timed out waiting for
-- the answer, so nobody was given the id), unless it has been renewed since (a retry of the
-- same stream was given it by then: it is held). Nothing is announced: nobody holds it.
-- KEYS[1] the account's tag hash
-- ARGV: account, id (16 raw bytes), origin, channel
-- Reply: {'discarded' | 'kept' | 'absent', expired}
local account, id, origin, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
local h = account_hash(KEYS[1], account)
local expired = expire_overdue(h, now, origin, channel)
local s
for _, t in ipairs(h.sessions) do
  if t.id == id and t.code == 'a' and not t.removed then
    s = t
  end
end
if not s then
  save(h)
  return {'absent', expired}
end
if s.expires ~= s.created + s.ttl then
  save(h)
  return {'kept', expired}
end
remove(h, s)
save(h)
return {'discarded', expired}
