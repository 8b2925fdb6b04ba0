-- POST a PNG as the raw body:  wrk -t2 -c32 -d10s --latency -s png.lua URL -- digit.png
local here = debug.getinfo(1, "S").source:sub(2):match("^(.*[/\\])") or "./"
dofile(here .. "_report.lua")

function init(args)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "image/png"
   wrk.body = read_file(args[1])
end
