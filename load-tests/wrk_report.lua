-- wrk script used by bench.py: print one machine-readable summary line.
--
-- Only done() is defined, so wrk keeps its pre-built request and calls no Lua
-- per request (the load generator stays as fast as plain wrk). With
-- arguments (`-- HOSTS N`), requests rotate over the Host headers
-- svc-0 .. svc-(N-1) (scale-of-config mode); that path calls request() per
-- request and is slower, which is why it is only used where needed.

local hosts_n = 0
local reqs = {}
local idx = 0

function init(args)
  if args[1] == "HOSTS" then
    hosts_n = tonumber(args[2])
    local path = args[3] or "/"
    for k = 0, hosts_n - 1 do
      reqs[k + 1] = wrk.format("GET", path, { Host = "svc-" .. k })
    end
    request = function()
      idx = idx % hosts_n + 1
      return reqs[idx]
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, "err_timeout": %d, ' ..
    '"lat_mean_us": %.1f, "lat_max_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
