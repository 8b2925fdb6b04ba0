"""deploy/monitoring: alert rules checked and unit-tested with promtool, the Grafana
dashboard's queries run against a real Prometheus scraping a real torchship server."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import torch
import yaml
from monitoring_utils import BOOM, save_digits, scrape, serve_in_thread, wait_for
from serving_utils import ROOT, SAMPLE, free_port

from torchship.serving.metrics import record_cache, record_rate_limited
from torchship.serving.settings import ServeSettings

MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "torchship.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
METRIC = re.compile(r"\b((?:torchship|process)_[a-z_]+)\b")


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panel_exprs() -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"])
        for p in _dashboard()["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def _rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


def _instant(expr: str) -> str:
    """A dashboard query as Prometheus runs it: Grafana's variables filled in."""
    return (
        expr.replace("$__rate_interval", "30s")
        .replace('"$model"', '".*"')
        .replace('"$version"', '".*"')
    )


# --- static checks -----------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    d = _dashboard()
    assert d["uid"] and d["title"]
    panels = d["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "model", "version"} <= variables
    titles = {p["title"] for p in panels}
    for needed in (
        "Throughput",
        "5xx error rate",
        "p99 latency",
        "Batch size",
        "Queue depth and in-flight requests",
        "Traffic share by version",
        "p99 latency by version",
    ):
        assert needed in titles
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}"
            for t in p["targets"]:
                used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
                assert used <= variables, (p["title"], used)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    check = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 5 rules found" in check.stdout
    tests = subprocess.run(
        [str(PROMTOOL), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        cwd=MONITORING,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_alerts_cover_error_rate_latency_and_readiness() -> None:
    names = {name for name, _ in _rule_exprs()}
    assert {
        "TorchshipHighErrorRate",
        "TorchshipHighLatencyP99",
        "TorchshipNotReady",
        "TorchshipDown",
    } <= names


# --- a real server, a real Prometheus ------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, quick_mlp: torch.nn.Module) -> Iterator[str]:
    from monitoring_utils import write_buggy_handler

    from torchship.serving.fastapi_app import create_app

    folder = tmp_path_factory.mktemp("prom")
    settings = ServeSettings(
        store=save_digits(folder / "models", quick_mlp, versions=2),
        models=["digits:1", "digits:2"],
        runtime="eager",
        max_batch_size=8,
        handlers={"digits": write_buggy_handler(folder)},
        access_log=False,
    )
    with serve_in_thread(create_app(settings, load_in_background=False), "fastapi") as base:
        # traffic of every kind, so every metric the dashboard and alerts use exists
        for version in ("1", "2"):
            with SAMPLE.open("rb") as fh:
                r = requests.post(
                    f"{base}/predict", params={"version": version}, files={"file": fh}, timeout=30
                )
                assert r.ok, r.text
        requests.post(f"{base}/predict", data=BOOM, headers={"Content-Type": "image/png"})
        requests.post(f"{base}/predict", files={"file": ("x.png", b"nope", "image/png")})
        record_cache("digits", "1", hit=True)
        record_cache("digits", "1", hit=False)
        record_rate_limited("client")
        yield base


def test_dashboard_and_alerts_use_only_exported_metrics(server: str) -> None:
    exported = scrape(server).names()
    families = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in exported}
    for where, expr in [*_panel_exprs(), *_rule_exprs()]:
        for name in METRIC.findall(expr):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert name in exported or base in families, f"{where}: {name} is not exported"


@pytest.fixture(scope="module")
def prometheus(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian: prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "torchship",
                "static_configs": [{"targets": [server.removeprefix("http://")]}],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError((folder / "prometheus.log").read_text())
            try:
                return requests.get(f"{base}/-/ready", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_for(ready, timeout=30, what="prometheus ready")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(prom: str, expr: str) -> dict[str, Any]:
    r = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body: dict[str, Any] = r.json()
    assert r.ok and body["status"] == "success", (expr, body)
    return body


def test_prometheus_scrapes_the_server_and_loads_the_alerts(prometheus: str, server: str) -> None:
    def predicted() -> list[Any] | None:
        result = _query(
            prometheus,
            'sum by (version) (torchship_requests_total{endpoint="/predict", code="200"})',
        )["data"]["result"]
        return result if len(result) == 2 else None

    result = wait_for(predicted, timeout=30, what="torchship_requests_total in Prometheus")
    assert {r["metric"]["version"]: float(r["value"][1]) for r in result} == {"1": 1.0, "2": 1.0}
    up = _query(prometheus, 'up{job="torchship"}')["data"]["result"]
    assert [float(r["value"][1]) for r in up] == [1.0]
    rules = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert {name for name, _ in _rule_exprs()} == set(loaded)
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
    ready = _query(prometheus, "min(torchship_ready)")["data"]["result"]
    assert float(ready[0]["value"][1]) == 1.0


def test_every_dashboard_query_runs_in_prometheus(prometheus: str) -> None:
    # wait for a few scrapes so rate() windows hold two samples
    def scrapes() -> float:
        result = _query(prometheus, "count_over_time(up[30s])")["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    wait_for(lambda: scrapes() >= 3, timeout=30, what="three scrapes")
    for _title, expr in _panel_exprs():
        _query(prometheus, _instant(expr))  # parses and evaluates, or fails naming the query
    for name in ("Throughput", "p99 latency", "Worker processes"):
        (expr,) = [e for t, e in _panel_exprs() if t == name]
        result = _query(prometheus, _instant(expr))["data"]["result"]
        assert result, f"{name}: no data"
