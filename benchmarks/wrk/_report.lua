-- Shared by the POST scripts: read the body file, count statuses, print one JSON line.
--
-- The scripts take the body file as their argument:  wrk ... URL -- path/to/body
-- done() prints   WRK_JSON {"requests": ..., "latency_us": {...}, "statuses": {...}}
-- so benchmarks/serving.py does not have to parse wrk's human-readable report.

local threads = {}

function read_file(path)
   local fh = assert(io.open(path, "rb"), "cannot open body file " .. tostring(path))
   local data = fh:read("*a")
   fh:close()
   return data
end

function setup(thread)
   table.insert(threads, thread)
end

statuses = {}

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

local function json_object(map)
   local parts = {}
   for key, value in pairs(map) do
      table.insert(parts, string.format('"%s": %s', tostring(key), tostring(value)))
   end
   return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency, requests)
   local merged = {}
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses") or {}) do
         merged[status] = (merged[status] or 0) + count
      end
   end
   local lat = {
      mean = string.format("%.1f", latency.mean),
      max = latency.max,
      p50 = latency:percentile(50),
      p90 = latency:percentile(90),
      p99 = latency:percentile(99),
   }
   local errors = summary.errors
   io.write("WRK_JSON ", json_object({
      requests = summary.requests,
      duration_us = summary.duration,
      bytes = summary.bytes,
      latency_us = json_object(lat),
      statuses = json_object(merged),
      socket_errors = json_object({
         connect = errors.connect, read = errors.read, write = errors.write,
         timeout = errors.timeout,
      }),
      status_errors = errors.status,
   }), "\n")
end
