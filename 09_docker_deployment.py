"""Lesson 09 — Docker deployment: one image, replicas behind a load balancer, Kubernetes.

What you will see:
  1. the Dockerfile, stage by stage, and hadolint's verdict on it;
  2. `torchship package`: a ready-to-build context for one model version;
  3. the compose topology — replicas behind nginx, Prometheus, Grafana — run for real on this
     machine: nginx in front of two torchship replicas, requests spread over both, and one
     replica killed under load without a single failed request;
  4. the Kubernetes manifests (probes, drain, non-root, read-only root, HPA, GPU, KServe V2),
     validated offline against the Kubernetes schemas;
  5. the image built with buildah and run with podman (when they are installed): ready,
     a prediction, then SIGTERM and a clean exit.

Run: python 09_docker_deployment.py   (offline; ~40 s, plus the image: ~3 min the first time,
~30 s once cached. TORCHSHIP_LESSON_IMAGE=0 skips the image.) The image stays in podman's
storage (~1.1 GB, `podman rmi localhost/torchship-lesson09`) and the wheels it was built
from in ~/.cache/torchship/wheelhouse: both make the next run fast.
"""

import collections
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import requests
import yaml
from rich.markup import escape

from torchship.demo import train_demo
from torchship.deploy import free_port, write_package
from torchship.deploy.image import (
    build_image,
    default_wheelhouse,
    make_wheelhouse,
    remove_container,
    run_container,
    stop_container,
    wait_ready,
    why_no_image,
)
from torchship.deploy.lint import hadolint, validate_kubernetes
from torchship.deploy.nginx import SITE, LocalNginx
from torchship.errors import MissingDependencyError
from torchship.store import ModelStore
from torchship.tutorial import say, section, table, workdir
from torchship.zoo import digits

work = workdir("lesson_09").resolve()
store = ModelStore(work / "models")
train_demo(store, "digits", arch="mlp", epochs=3, export=False)
data = digits.load_digits_split()
x, y = data.x_test[:8], data.y_test[:8]

section("1. The Dockerfile")
dockerfile = Path("deploy/docker/Dockerfile")
for line in dockerfile.read_text().splitlines():
    if line.startswith(("FROM", "USER", "HEALTHCHECK", "ENTRYPOINT", "STOPSIGNAL")):
        say(f"  {line[:96]}")
say("stages: builder (torchship's wheel), models (the store), runtime (what runs)")
say("runtime layers: dependencies, then code, config, models: a code change never")
say("rebuilds the ~1 GB dependency layer")
try:
    findings = hadolint(dockerfile)
    say(f"hadolint: {findings or 'passed'}")
except MissingDependencyError as exc:
    say(escape(f"hadolint: skipped, {exc.message} ({exc.hint})"))

section("2. torchship package: one model, ready to build")
ctx = write_package(store, "digits", work / "context")
say(f"{ctx.ref} -> {ctx.path.name}/: {', '.join(sorted(p.name for p in ctx.path.iterdir()))}")
say(f"pinned requirements: {len(ctx.requirements)}, e.g. {ctx.requirements[-1]}")
for path, digest in ctx.files.items():
    say(f"  {path}  sha256 {digest[:12]}… (verified before and after copying)")

section("3. The compose topology, for real: nginx + two replicas on loopback")
compose = yaml.safe_load(Path("deploy/compose.yaml").read_text())
say(f"deploy/compose.yaml services: {', '.join(compose['services'])}")
replicas = []
for i in range(2):
    port = free_port()
    log = (work / f"replica-{i}.log").open("wb")
    cmd = [sys.executable, "-m", "torchship", "serve", "--store", str(store.root)]
    cmd += ["--port", str(port), "--runtime", "eager", "--max-batch-size", "8", "--threads", "1"]
    replicas.append((f"127.0.0.1:{port}", subprocess.Popen(cmd, stdout=log, stderr=log)))
lb = LocalNginx(SITE, [addr for addr, _ in replicas], free_port(), work / "nginx")


def stop_all():
    lb.stop()
    for _, proc in replicas:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


try:
    for addr, _ in replicas:
        wait_ready(f"http://{addr}", timeout=90)
    lb.start()
except BaseException:
    stop_all()
    raise
say(f"nginx ({SITE}) on {lb.url} -> {', '.join(addr for addr, _ in replicas)}")


def predict(session, i):
    return session.post(f"{lb.url}/predict", json={"inputs": x[i % 8 : i % 8 + 1].tolist()})


seen = collections.Counter()
with requests.Session() as s:
    for i in range(40):
        seen[predict(s, i).headers["X-Upstream"]] += 1
table("answers per replica (least_conn)", ["replica", "requests"], seen.items())

results, errors, lock = [], [], threading.Lock()
killed = threading.Event()


def client(k):
    with requests.Session() as s:
        for i in range(k, 240, 4):
            try:
                r = predict(s, i)
            except requests.RequestException as exc:
                errors.append(exc)
                continue
            with lock:
                results.append((r.status_code, r.headers.get("X-Upstream", "")))
                if len(results) == 60 and not killed.is_set():
                    killed.set()
                    replicas[0][1].send_signal(signal.SIGKILL)  # a crash, mid-load


try:
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
finally:
    stop_all()
failed = sum(1 for status, _ in results if status != 200) + len(errors)
retried = sum(1 for _, up in results if ", " in up)
say(f"killed replica {replicas[0][0]} after 60 of {len(results)} requests under load")
say(f"requests failed: {failed}; retried by nginx on the other replica: {retried}")
for exc in errors[:3]:  # what a failure was, if any
    say(f"  failed: {type(exc).__name__}: {exc}")
say("load balancer and replicas stopped")

section("4. Kubernetes")
deployment = yaml.safe_load(Path("deploy/k8s/deployment.yaml").read_text())
container = deployment["spec"]["template"]["spec"]["containers"][0]
for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
    say(f"  {probe}: {container[probe]['httpGet']['path']}")
say(f"  preStop: {container['lifecycle']['preStop']['exec']['command']}, then SIGTERM drains")
say(f"  securityContext: {container['securityContext']}")
manifests = sorted(p for p in Path("deploy/k8s").rglob("*.yaml") if p.name != "kustomization.yaml")
rows = []
try:
    for path in manifests:
        problems = validate_kubernetes(path)
        crd = problems and all("no Kubernetes schema" in p for p in problems)
        verdict = "CRD (KServe): structure checked by the tests" if crd else problems or "passed"
        rows.append((path, verdict))
except MissingDependencyError as exc:
    say(escape(f"kubernetes-validate: skipped, {exc.message} ({exc.hint})"))
else:
    table("kubernetes-validate --strict", ["manifest", "verdict"], rows)
    bad = [row for row in rows if row[1] not in ("passed",) and not str(row[1]).startswith("CRD")]
    say(f"kubernetes-validate --strict: {bad or 'passed'}")

section("5. The image, built and run for real")
reason = why_no_image()
if os.environ.get("TORCHSHIP_LESSON_IMAGE") == "0":
    reason = "TORCHSHIP_LESSON_IMAGE=0"
if reason:
    say(f"skipped: {reason}")
else:
    from torchship.deploy.base_image import ensure_base_image

    if ensure_base_image():
        say("made python:3.11-slim from Debian packages (once; kept in local storage)")
    wheels = make_wheelhouse(ctx.path / "requirements.txt", default_wheelhouse())
    tag = "localhost/torchship-lesson09:latest"
    built = build_image(ctx.path, tag, wheelhouse=wheels)
    say(f"built {tag}: {built.size_bytes / 1e9:.2f} GB in {built.seconds:.0f} s (layers cached)")
    name, port = "torchship-lesson09", free_port()
    remove_container(name)
    try:
        run_container(tag, name=name, port=port)  # read-only root, non-root user
        took = wait_ready(f"http://127.0.0.1:{port}", timeout=120, name=name)
        r = requests.post(f"http://127.0.0.1:{port}/predict", json={"inputs": x[:4].tolist()})
        labels = [p["label"] for p in r.json()["predictions"]]
        say(f"container ready in {took:.1f} s; digits {y[:4].tolist()} -> predicted {labels}")
        code = stop_container(name)
        say(f"podman stop (SIGTERM): the server drained and exited, exit code {code}")
    finally:
        remove_container(name)
