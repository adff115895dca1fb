-- One wrk script for every scenario. BENCH_DATA names a Lua file (written by bench/wrk.py) that
-- returns {method, headers, paths, body, patients, codes}: each request takes a random path and,
-- for writes, the body template with a random patient, a random code and a unique identifier.
-- done() writes the figures as JSON to BENCH_OUT (wrk's own text report has no p95).
local data = dofile(os.getenv("BENCH_DATA"))
local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   -- Threads start together: seed with the thread number so that they draw different sequences.
   math.randomseed(os.time() * 1000 + (tid or 0))
end

local function pick(list)
   return list[math.random(#list)]
end

function request()
   local path = pick(data.paths)
   if data.body == nil then
      return wrk.format(data.method, path, data.headers)
   end
   counter = counter + 1
   local uid = string.format("%d-%d-%d", tid or 0, counter, math.random(1000000000))
   local body = data.body:gsub("{{UID}}", uid)
   if data.patients then body = body:gsub("{{PATIENT}}", pick(data.patients)) end
   if data.codes then body = body:gsub("{{CODE}}", pick(data.codes)) end
   return wrk.format(data.method, path, data.headers, body)
end

function done(summary, latency, requests)
   local e = summary.errors
   local out = io.open(os.getenv("BENCH_OUT"), "w")
   out:write(string.format(
      '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p95":%d,"p99":%d,"mean":%.1f,"max":%d}}',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, latency.max))
   out:close()
end
