-- discard: removes a session admitted by an open whose caller gave up (it timed out waiting for
-- the answer, so nobody was given the id), unless it has been renewed since (a retry of the
-- same stream was given it by then: it is held). Nothing is announced: nobody holds it.
-- KEYS[1] A..'streams', KEYS[2] A..'age', KEYS[3] A..'exp', KEYS[4] A..'cut'
-- ARGV: P, A, id, origin, channel
-- Reply: {'discarded' | 'kept' | 'absent', expired}
local P, A, id, origin, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = now_ms()
local expired = expire_overdue(P, A, now, origin, channel)
local rec = record(P, id)
if not rec or rec[4] ~= 'active' then
  return {'absent', expired}
end
if rec[7] ~= rec[6] + rec[8] then
  return {'kept', expired}
end
if redis.call('HGET', KEYS[1], rec[3]) == id then
  redis.call('HDEL', KEYS[1], rec[3])
end
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[3], id)
redis.call('DEL', P .. 's:' .. id)
return {'discarded', expired}
