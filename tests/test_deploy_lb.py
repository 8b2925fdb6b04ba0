"""The compose topology's nginx, for real on loopback: spread, and a replica crash under load.

nginx (the Debian package) runs as an ordinary process with deploy/nginx/torchship.conf,
changed only in its listen address and upstream server lines, in front of two
``torchship serve`` replicas.
"""

from __future__ import annotations

import collections
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from deploy_utils import held_out_inputs, local_labels, quick_digits_store, replicas
from serving_utils import ROOT, free_port

from torchship.deploy.nginx import SITE, LocalNginx, render_site
from torchship.errors import ConfigError

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (apt-get install nginx, or make system-deps)",
)

X = held_out_inputs(8)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quick_digits_store(tmp_path_factory.mktemp("lb") / "models").root


@pytest.fixture(scope="module")
def expected(store_root: Path) -> list[str]:
    from torchship.store import ModelStore

    return local_labels(ModelStore(store_root), X)


@pytest.fixture(scope="module")
def cluster(
    store_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalNginx, list]]:
    """Two replicas behind nginx, shared by the module (the crash test, last, ends one)."""
    work = tmp_path_factory.mktemp("lb-run")
    args = ("--runtime", "eager", "--max-batch-size", "8")
    with replicas(store_root, 2, work / "logs", *args) as procs:
        lb = LocalNginx(ROOT / SITE, [addr for addr, _ in procs], free_port(), work / "nginx")
        with lb:
            yield lb, procs


def predict(session: requests.Session, url: str, i: int) -> requests.Response:
    return session.post(f"{url}/predict", json={"inputs": X[i : i + 1].tolist()}, timeout=30)


def test_requests_spread_across_both_replicas(cluster, expected) -> None:
    lb, procs = cluster
    seen: collections.Counter[str] = collections.Counter()
    with requests.Session() as s:
        for n in range(40):
            r = predict(s, lb.url, n % len(X))
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["label"] == expected[n % len(X)]
            seen[r.headers["X-Upstream"]] += 1
    print("answers per replica:", dict(seen))
    assert set(seen) == {addr for addr, _ in procs}
    assert min(seen.values()) >= 10  # least_conn on ties takes turns


def test_bad_input_is_a_4xx_through_the_balancer(cluster) -> None:
    lb, _ = cluster
    r = requests.post(f"{lb.url}/predict", json={"inputs": "seven"}, timeout=30)
    assert r.status_code == 400 and r.json()["code"] == "invalid_input"
    r = requests.post(f"{lb.url}/predict", data=b"x" * (11 * 1024 * 1024), timeout=30)
    assert r.status_code == 413  # nginx's client_max_body_size, before any replica
    r = requests.get(f"{lb.url}/manage/models", timeout=30)
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    assert requests.get(f"{lb.url}/health/ready", timeout=30).status_code == 200


def test_killing_a_replica_under_load_fails_no_request(cluster, expected) -> None:
    """Last of the cluster's tests: it kills one of its replicas."""
    lb, procs = cluster
    (victim_addr, victim), (survivor_addr, _) = procs
    results: list[tuple[int, str, bool]] = []  # (status, upstream, label ok)
    errors: list[str] = []
    lock = threading.Lock()
    before_kill, after_kill = 40, 80
    killed = threading.Event()
    done = threading.Event()

    def client(k: int) -> None:
        n = k
        with requests.Session() as s:
            while not done.is_set():
                try:
                    r = predict(s, lb.url, n % len(X))
                    ok = r.status_code == 200 and (
                        r.json()["predictions"][0]["label"] == expected[n % len(X)]
                    )
                    row = (r.status_code, r.headers.get("X-Upstream", ""), ok)
                except requests.RequestException as exc:
                    with lock:
                        errors.append(repr(exc))
                    continue
                finally:
                    n += 4
                with lock:
                    results.append(row)
                    count = len(results)
                if count >= before_kill and not killed.is_set():
                    killed.set()
                    victim.send_signal(signal.SIGKILL)  # a crash: no draining, no goodbye
                if killed.is_set() and count >= before_kill + after_kill:
                    done.set()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert not errors, errors[:3]
    failed = [r for r in results if r[0] != 200 or not r[2]]
    assert not failed, failed[:5]
    assert len(results) >= before_kill + after_kill
    # after the kill the survivor answered everything, some of it on nginx's retry
    tail = results[before_kill + 8 :]
    assert all(up.split(", ")[-1] == survivor_addr for _, up, _ in tail)
    retried = [up for _, up, _ in results if ", " in up]
    log = lb.error_log.read_text()
    print(f"{len(results)} requests, 0 failed; {len(retried)} retried on the survivor")
    assert retried or "failed" in log  # nginx saw the dead replica and went elsewhere
    assert victim_addr in log


def test_render_site_changes_only_listen_and_servers() -> None:
    site = (ROOT / SITE).read_text()
    out = render_site(site, ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3")
    assert "server 127.0.0.1:1 max_fails=1 fail_timeout=10s;" in out
    assert "server 127.0.0.1:2 max_fails=1 fail_timeout=10s;" in out
    assert "listen 127.0.0.1:3;" in out and "listen 80;" not in out
    removed = set(site.splitlines()) - set(out.splitlines())
    assert {line.strip() for line in removed} == {
        "server torchship:8000 max_fails=1 fail_timeout=10s;",
        "listen 80;",
    }
    with pytest.raises(ConfigError):
        render_site(site, [], "127.0.0.1:3")
    with pytest.raises(ConfigError):
        render_site("server { listen 80; }", ["127.0.0.1:1"], "127.0.0.1:3")
