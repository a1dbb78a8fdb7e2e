-- wrk script: viewers that open a session and end it. Request 2k opens stream "s" of account
-- "w<run>-k" (PUT); request 2k+1 ends the session opened 64 requests earlier (DELETE), long
-- after its open was answered. So half the requests are admissions and about 32 sessions of
-- the load are open at any time. Every connection of a thread shares one counter.
local counter = 0
local run = tostring(os.time()) .. tostring(math.random(1000000))

function setup(thread)
  thread:set("id", tostring(math.random(1000000000)))
end

request = function()
  counter = counter + 1
  local k = math.floor(counter / 2)
  if counter % 2 == 0 then
    return wrk.format("PUT", "/streaming?account=w" .. run .. "-" .. id .. "-" .. k .. "&streamId=s")
  end
  return wrk.format("DELETE", "/streaming?account=w" .. run .. "-" .. id .. "-" .. (k - 32) .. "&streamId=s")
end
