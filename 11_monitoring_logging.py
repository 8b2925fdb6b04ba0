"""Lesson 11 — Monitoring and logging: metrics, latency, error logs, request logs, tools.

What you will see, against a real torchship server with two worker processes:
  1. traffic of every kind: good requests, bad inputs, a version with a production bug;
  2. Prometheus metrics scraped from /metrics: requests by status code, latency
     percentiles per stage (queue wait, preprocessing, inference), batch sizes, errors by
     type, gauges and per-process memory, summed over both workers whichever one answers;
  3. structured JSON logs: one line per request with its request id, latency, model and
     version; sampled request/response bodies, truncated, with secrets redacted; the bug
     logged once with its traceback while the client only sees a generic 500;
  4. TensorBoard: a batch job writes its throughput and totals as a TensorBoard run;
  5. monitoring tools: the status page, the Grafana dashboard and alert rules in
     deploy/monitoring (checked by promtool when it is installed).

Run: python 11_monitoring_logging.py   (offline, ~40 s; starts and stops its own server)
"""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from rich.markup import escape

from torchship import batch
from torchship.errors import MissingDependencyError
from torchship.monitoring.scrape import scrape
from torchship.monitoring.tensorboard import read_scalars
from torchship.store import ModelStore
from torchship.tutorial import say, section, table, workdir
from torchship.zoo import digits
from torchship.zoo.faulty import FaultyDigits

work = workdir("lesson_11")
store = ModelStore(work / "models")
data = digits.load_digits_split()

section("1. Two versions, two worker processes, JSON logs")
good = digits.train("mlp", data=data)
store.save(good.model, "digits", input_spec=digits.input_spec(), labels=digits.LABELS)
buggy = FaultyDigits(fail_rate=0.5, healthy_calls=3)  # passes warm-up, then fails half
buggy.load_state_dict(good.model.state_dict())
store.save(buggy, "digits", input_spec=digits.input_spec(), labels=digits.LABELS)
say("saved digits:1 (healthy) and digits:2 (same weights, fails 50% of batches under load)")

with socket.socket() as s:  # a free local port
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
log_file = work / "server.log"
with log_file.open("wb") as out:
    server = subprocess.Popen(
        [
            sys.executable, "-m", "torchship", "serve",
            "--store", str(store.root), "--model", "digits:1", "--model", "digits:2",
            "--port", str(port), "--workers", "2", "--runtime", "eager",
            "--max-batch-size", "8",
            "--log-format", "json",          # one JSON object per line
            "--log-sample-rate", "0.25",     # a quarter of the successes; every error
            "--log-bodies", "--log-max-body-chars", "160",
            "--log-redact-field", "password", "--log-redact-field", "authorization",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
base = f"http://127.0.0.1:{port}"
try:
    for _ in range(1200):
        try:
            if requests.get(f"{base}/health/ready", timeout=1).ok:
                ready = scrape(base)
                if ready.value("torchship_workers") == 2 and ready.value("torchship_ready") == 1:
                    break
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    say(f"server ready at {base} with 2 workers; its log lines go to {log_file}")

    section("2. Traffic: good, bad, and a version with a bug")

    def predict(i: int, version: str = "1") -> requests.Response:
        return requests.post(
            f"{base}/predict",
            params={"version": version},
            json={"inputs": data.x_test[i].tolist()},
            headers={"X-Request-ID": f"lesson-{version}-{i}"},
            timeout=30,
        )

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(predict, range(120)))
        answers += list(pool.map(lambda i: predict(i, "2"), range(40)))
    codes = [r.status_code for r in answers]
    say(
        f"160 test digits from 6 clients (40 pinned to v2): "
        f"{codes.count(200)} answered 200, {codes.count(500)} failed with 500"
    )
    bad = {
        "corrupt image": requests.post(
            f"{base}/predict", files={"file": ("x.png", b"not a png", "image/png")}, timeout=30
        ),
        "wrong shape": requests.post(f"{base}/predict", json={"inputs": [[1, 2, 3]]}, timeout=30),
        "unknown model": requests.post(
            f"{base}/predict", params={"model": "cats"}, json={"inputs": []}, timeout=30
        ),
        "secret in body": requests.post(
            f"{base}/predict",
            json={"inputs": "oops", "password": "hunter2"},
            headers={"X-Request-ID": "lesson-secret", "Authorization": "Bearer s3cr3t"},
            timeout=30,
        ),
    }
    table(
        "bad requests get clear 4xx answers",
        ["request", "status", "code", "error"],
        [[k, r.status_code, r.json()["code"], r.json()["error"][:60]] for k, r in bad.items()],
    )
    with Path("data/sample.jpg").open("rb") as fh:
        sample = requests.post(
            f"{base}/predict",
            files={"file": fh},
            headers={"X-Request-ID": "lesson-sample"},
            timeout=30,
        )
    say(
        f"data/sample.jpg -> label {sample.json()['predictions'][0]['label']}, "
        f"X-Request-ID {sample.headers['X-Request-ID']}"
    )

    section("3. Metrics from /metrics (both workers, whichever answers)")
    m = scrape(base)
    table(
        "requests by status code (inference)",
        ["version", "code", "requests"],
        [
            [v or "-", code, int(n)]
            for (v, code), n in sorted(
                m.by("torchship_requests_total", "version", "code", endpoint="/predict").items()
            )
        ],
    )
    stages = [
        ("end to end", "torchship_request_latency_seconds"),
        ("queue wait", "torchship_queue_wait_seconds"),
        ("preprocess", "torchship_preprocess_seconds"),
        ("inference (per batch)", "torchship_inference_seconds"),
    ]
    table(
        "latency of digits:1 from the histograms (ms)",
        ["stage", "p50", "p90", "p99", "observations"],
        [
            [
                stage,
                *(
                    f"{1000 * m.quantile(q, metric, model='digits', version='1'):.2f}"
                    for q in (0.5, 0.9, 0.99)
                ),
                int(m.value(f"{metric}_count", model="digits", version="1")),
            ]
            for stage, metric in stages
        ],
    )
    batches = m.value("torchship_batch_size_count", model="digits")
    say(
        f"batching: {int(m.value('torchship_batch_size_sum', model='digits'))} items in "
        f"{int(batches)} batches (mean {m.value('torchship_batch_size_sum', model='digits') / batches:.2f}, "
        f"p99 {m.quantile(0.99, 'torchship_batch_size', model='digits'):.1f})"
    )
    table(
        "errors by type",
        ["model", "version", "type", "count"],
        [
            [mo or "-", v or "-", t, int(n)]
            for (mo, v, t), n in sorted(
                m.by("torchship_errors_total", "model", "version", "type").items()
            )
        ],
    )
    memory = m.by("process_resident_memory_bytes", "pid")
    say(
        f"gauges: {int(m.value('torchship_workers'))} workers, "
        f"{int(m.value('torchship_in_flight_requests'))} request in flight (this scrape), "
        f"ready={int(m.value('torchship_ready'))}, load time digits:1 "
        f"{m.value('torchship_model_load_seconds', model='digits', version='1'):.2f} s, "
        "memory per worker "
        + ", ".join(f"pid {pid}: {b / 2**20:.0f} MiB" for (pid,), b in sorted(memory.items()))
    )

    section("4. Structured logs: request ids, sampled bodies, errors logged once")
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    access = [x for x in lines if x["logger"] == "torchship.access"]
    ok_lines = [x for x in access if x["status"] == 200 and x["path"] == "/predict"]
    say(f"successful requests logged: {len(ok_lines)} of {codes.count(200) + 1} (sampled 25%)")
    say("one of them (the request id is the client's X-Request-ID, or a fresh one):")
    shown = {k: v for k, v in ok_lines[0].items() if k not in ("request_headers", "client")}
    say(json.dumps(shown))
    (secret,) = [x for x in access if x.get("request_id") == "lesson-secret"]
    say(f"redacted: request_body={secret['request_body']}")
    say(f"          authorization={secret['request_headers'].get('authorization')}")
    failed = [x for x in access if x["status"] >= 500]
    tracebacks = [x for x in lines if "traceback" in x]
    say(
        f"{len(failed)} requests failed with 500 -> {len(tracebacks)} error lines with a "
        "traceback (one per failed batch: the bug is logged once, not once per layer)"
    )
    if tracebacks:
        say(f"  {tracebacks[0]['message']}: ...{tracebacks[0]['traceback'].splitlines()[-1]}")
    client_view = next((r.json() for r in answers if r.status_code == 500), None)
    say(f"  what the client saw: {client_view}")

    section("5. TensorBoard: a batch job's throughput")
    inputs = work / "digits.npy"
    np.save(inputs, data.x_test.numpy())
    try:
        summary = batch.run(
            "digits:1",
            inputs,
            work / "predictions.csv",
            store=store,
            batch_size=32,
            num_workers=0,
            runtime="eager",
            tensorboard=work / "tensorboard",
        )
    except MissingDependencyError as exc:
        say(escape(f"skipped: {exc.message} ({exc.hint})"))
    else:
        say(str(summary))
        (run,) = (work / "tensorboard").iterdir()
        scalars = read_scalars(run)
        say(
            f"TensorBoard run {run.name}: {len(scalars['batch/items_per_s'])} throughput "
            f"points, tags {sorted(t for t in scalars if t.startswith('batch/summary'))}"
        )
        say(f"see it with: tensorboard --logdir {work / 'tensorboard'}")

    section("6. Monitoring tools")
    status = requests.get(f"{base}/status", timeout=10).json()
    say(
        f"status page: open {base}/ in a browser (models, traffic policy, live rate and "
        f"latency, a drawing playground); /status says {int(status['metrics']['requests'])} "
        "inference requests so far"
    )
    dashboard = json.loads(Path("deploy/monitoring/grafana/dashboards/torchship.json").read_text())
    say(
        f"Grafana dashboard '{dashboard['title']}': "
        + ", ".join(p["title"] for p in dashboard["panels"] if p["type"] == "row")
    )
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "rules", "deploy/monitoring/alerts.yml"],
            capture_output=True,
            text=True,
        )
        say(f"alert rules: {' '.join(check.stdout.split())}")
    else:
        say("alert rules: deploy/monitoring/alerts.yml (install Debian 'prometheus' for promtool)")
finally:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    say(f"server stopped (exit {server.returncode})")
