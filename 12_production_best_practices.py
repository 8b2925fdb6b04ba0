"""Lesson 12 — Production best practices: keys, rate limits, caching, probes, draining.

Every protection on at once, against a real torchship server on a free local port:
  1. API keys: generated, stored only as SHA-256 digests, scoped (inference / admin);
  2. health checks while the server warms up: live at once, startup and ready later;
  3. a refused key (401), a key without the scope (403), open health endpoints;
  4. rate limiting: a token bucket per key, a 429 with Retry-After and RateLimit-* headers;
  5. caching: the same input twice (a miss, then a hit, and what it saves), a bypass,
     and a new version never answered from the old version's entries;
  6. security headers and CORS;
  7. graceful shutdown for load balancers: not ready first while still serving, then
     drain and exit 0.
Load balancing across processes (`--workers N`, a killed worker replaced) is exercised
by tests/test_faults.py and benchmarks/soak.py.

Run: python 12_production_best_practices.py   (offline, ~20 s; starts and stops its server)
"""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from torchship.serving.policies import new_key
from torchship.serving.policies.auth import keys_file_template, make_key
from torchship.store import ModelStore
from torchship.tutorial import say, section, table, workdir
from torchship.zoo import digits

work = workdir("lesson_12")
store = ModelStore(work / "models")
data = digits.load_digits_split()
for seed in (0, 1):  # two versions of the digits MLP
    result = digits.train("mlp", epochs=3, data=data, seed=seed)
    store.save(
        result.model,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=data.x_test[:32],
    )
digit = {"inputs": data.x_test[0].tolist()}  # a JSON tensor for most requests
image = Path("data/sample.jpg").read_bytes()  # a JPEG for the cache: decoding costs

section("1. API keys: random, scoped, stored hashed")
app_key, ops_key = new_key(), new_key()
keys_file = work / "keys.json"
keys_file.write_text(
    keys_file_template(
        [
            make_key("web-app", ["inference"], app_key),
            make_key("ops", ["inference", "admin"], ops_key),
        ]
    )
)
say(f"web-app key {app_key[:10]}... (inference), ops key {ops_key[:10]}... (inference+admin)")
table(
    f"{keys_file}: what the server reads (no secret in it)",
    ["name", "scopes", "sha256"],
    [
        [k["name"], "+".join(k["scopes"]), k["sha256"][:24] + "..."]
        for k in json.loads(keys_file.read_text())["keys"]
    ],
)

section("2. Start the server; probes while it warms up")
with socket.socket() as s:  # a free port
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
base = f"http://127.0.0.1:{port}"
server = subprocess.Popen(
    [
        *(sys.executable, "-m", "torchship", "serve", "--store", str(store.root)),
        *("--model", "digits:1", "--port", str(port), "--runtime", "eager"),
        *("--api-keys-file", str(keys_file)),
        *("--rate-limit", "inference=5:10", "--rate-limit", "admin=2:10"),
        *("--cache", "--cache-ttl-s", "600", "--cors-origin", "https://app.example"),
        *("--drain-delay-s", "3"),
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
APP, OPS = {"X-API-Key": app_key}, {"Authorization": f"Bearer {ops_key}"}


def probe(path: str) -> str:
    try:
        return str(requests.get(f"{base}{path}", timeout=2).status_code)
    except requests.ConnectionError:
        return "refused"


try:
    started, seen, timeline = time.monotonic(), None, []
    while True:
        state = tuple(probe(p) for p in ("/health/live", "/health/startup", "/health/ready"))
        if state != seen:
            timeline.append([f"{time.monotonic() - started:.2f} s", *state])
            seen = state
        if state == ("200", "200", "200") or time.monotonic() - started > 120:
            break
        time.sleep(0.02)
    table("probes during start-up", ["from", "live", "startup", "ready"], timeline)
    say("a load balancer sends traffic only once /health/ready says 200")

    section("3. Authentication: who may call what")
    rows = []
    for what, method, path, headers in [
        ("no key", "post", "/predict", {}),
        ("a wrong key", "post", "/predict", {"X-API-Key": "tsk_guess"}),
        ("web-app key", "post", "/predict", APP),
        ("web-app key on /manage", "get", "/manage/models", APP),
        ("ops key on /manage", "get", "/manage/models", OPS),
        ("no key on /health/ready", "get", "/health/ready", {}),
    ]:
        body = digit if method == "post" else None
        r = requests.request(method, f"{base}{path}", headers=headers, json=body)
        rows.append([what, path, r.status_code, r.json().get("error", "ok")[:70]])
    table("refused and accepted keys", ["request", "path", "status", "answer"], rows)
    refused = requests.post(f"{base}/predict", json=digit)
    say(f"a 401 says how to fix it: hint={refused.json()['hint']!r}")
    say(f"  WWW-Authenticate: {refused.headers['WWW-Authenticate']}")

    section("4. Rate limiting: 5 requests/s per key, bursts of 10")
    time.sleep(2.0)  # the sections above spent some of this key's tokens: a full bucket first
    rows, statuses = [], []
    while statuses.count(429) < 3 and len(statuses) < 40:
        r = requests.post(f"{base}/predict", json=digit, headers=APP)
        statuses.append(r.status_code)
        remaining, retry = r.headers["RateLimit-Remaining"], r.headers.get("Retry-After", "")
        rows.append([len(rows) + 1, r.status_code, remaining, retry])
        if r.status_code == 429:
            limited = r
    table(
        f"{len(rows)} requests back to back",
        ["#", "status", "RateLimit-Remaining", "Retry-After"],
        rows,
    )
    say(f"the 429: {limited.json()['error']}")
    headers = ("Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
    say("its headers: " + ", ".join(f"{h}: {limited.headers[h]}" for h in headers))
    other = requests.post(f"{base}/predict", json=digit, headers=OPS)
    say(f"another key has its own bucket: ops key -> {other.status_code}")

    section("5. Caching: keyed on model, version and input")

    def send_image(what: str, extra: dict[str, str] | None = None) -> list[str]:
        time.sleep(0.25)  # stay under the ops key's rate limit
        t0 = time.monotonic()
        r = requests.post(f"{base}/predict", data=image, headers={**OPS, **(extra or {})})
        r.raise_for_status()
        return [
            what,
            r.headers["X-Cache"],
            r.headers["X-Model-Version"],
            f"{r.json()['latency_ms']:.3f} ms",
            f"{(time.monotonic() - t0) * 1000:.1f} ms",
            r.json()["predictions"][0]["label"],
        ]

    send_image("warm-up", {"Cache-Control": "no-store"})  # JPEG decoder's first use; not kept
    rows = [
        send_image("first time"),
        send_image("same image again"),
        send_image("again, Cache-Control: no-cache", {"Cache-Control": "no-cache"}),
    ]
    # a new version, loaded and put in production through the management API
    requests.post(f"{base}/manage/models/digits/versions/2/load", headers=OPS).raise_for_status()
    requests.put(
        f"{base}/manage/models/digits/policy",
        json={"kind": "fixed", "version": "2", "reason": "lesson 12"},
        headers=OPS,
    ).raise_for_status()
    rows += [send_image("after switching to version 2"), send_image("version 2 again")]
    table(
        "the same JPEG, five times",
        ["request", "X-Cache", "version", "server latency", "round trip", "label"],
        rows,
    )
    miss_ms, hit_ms = (float(row[3].split()[0]) for row in rows[:2])
    say(
        f"a hit skips decoding and the model: {miss_ms:.3f} ms -> {hit_ms:.3f} ms in the "
        f"server ({miss_ms / max(hit_ms, 1e-3):.0f}x faster). Entries are shared by every "
        "client; a new version starts cold: no answer is ever served for a version other "
        "than the one routing chose"
    )
    say("the cache counters since start (section 4 sent one digit over and over: hits too):")
    for line in requests.get(f"{base}/metrics").text.splitlines():
        if line.startswith(("torchship_cache_hits_total", "torchship_cache_misses_total")):
            say(f"  {line}")

    section("6. Security headers and CORS")
    r = requests.get(f"{base}/health/live")
    for h in ("X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy"):
        say(f"  {h}: {r.headers[h]}")
    say(f"  Content-Security-Policy: {r.headers['Content-Security-Policy']}")
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key",
    }
    ok = requests.options(f"{base}/predict", headers={"Origin": "https://app.example", **preflight})
    bad = requests.options(
        f"{base}/predict", headers={"Origin": "https://evil.example", **preflight}
    )
    say(
        f"browser preflight from https://app.example -> {ok.status_code} "
        f"(Access-Control-Allow-Origin: {ok.headers.get('Access-Control-Allow-Origin')})"
    )
    say(f"from https://evil.example -> {bad.status_code}: {bad.json()['error']}")

    section("7. SIGTERM: not ready first, still serving, then drain and exit 0")
    server.send_signal(signal.SIGTERM)
    t0, rows = time.monotonic(), []
    while server.poll() is None and time.monotonic() - t0 < 40:
        ready = probe("/health/ready")
        try:
            r = requests.post(f"{base}/predict", json=digit, headers=OPS, timeout=5)
            served = f"{r.status_code} (Connection: {r.headers.get('Connection', 'keep-alive')})"
        except requests.ConnectionError:
            served = "refused"
        if rows and rows[-1][1:3] == [ready, served]:
            rows[-1][3] += 1
        else:
            rows.append([f"{time.monotonic() - t0:.2f} s", ready, served, 1])
        time.sleep(0.25)
    table(
        "after SIGTERM (--drain-delay-s 3)",
        ["from", "/health/ready", "POST /predict", "times"],
        rows,
    )
    say("the balancer saw 503 on /health/ready and stopped sending before the server stopped")
finally:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    say(f"server stopped (exit {server.returncode})")
