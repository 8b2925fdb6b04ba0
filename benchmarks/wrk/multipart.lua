-- POST a JPEG as a multipart upload in the field "file" (like curl -F "file=@photo.jpg"):
--   wrk -t2 -c32 -d10s --latency -s multipart.lua URL -- photo.jpg
local here = debug.getinfo(1, "S").source:sub(2):match("^(.*[/\\])") or "./"
dofile(here .. "_report.lua")

local boundary = "----torchshipbench7MA4YWxkTrZu0gW"

function init(args)
   local name = args[1]:match("([^/\\]+)$")
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
   wrk.body = "--" .. boundary .. "\r\n"
      .. 'Content-Disposition: form-data; name="file"; filename="' .. name .. '"\r\n'
      .. "Content-Type: image/jpeg\r\n\r\n"
      .. read_file(args[1]) .. "\r\n"
      .. "--" .. boundary .. "--\r\n"
end
