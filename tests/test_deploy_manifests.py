"""Dockerfile, compose and Kubernetes files: linted, schema-validated, and consistent with
the server they run (ports, probe paths, users, settings)."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from serving_utils import ROOT

from torchship.cli import build_parser
from torchship.serving.fastapi_app import create_app
from torchship.serving.settings import ServeSettings
from torchship.settings import load_settings

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
BIN = Path(sys.executable).parent
K8S_RESOURCES = sorted(
    p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "kserve" not in p.parts
)


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def tool(name: str) -> str:
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


@pytest.fixture(scope="module")
def routes() -> set[str]:
    app = create_app(ServeSettings(models=["digits"]))
    return {getattr(r, "path", "") for r in app.routes}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


# --- Dockerfile ----------------------------------------------------------------------------


def test_hadolint_passes_on_every_dockerfile(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    files = sorted(DEPLOY.rglob("Dockerfile*"))
    assert DOCKERFILE in files
    for f in files:
        proc = subprocess.run([hadolint, str(f)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{f}:\n{proc.stdout}{proc.stderr}"
    # and the linter does fail where it should (so its silence above means something)
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nCMD python app.py\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True).returncode != 0


def test_dockerfile_runs_a_non_root_drainable_healthchecked_server() -> None:
    rows = dockerfile_instructions()
    froms = [rest for word, rest in rows if word == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    assert any(word == "ARG" and rest.startswith("TORCH_INDEX=cpu") for word, rest in rows)
    users = [rest for word, rest in rows if word == "USER"]
    assert users and users[-1] not in ("0", "root")
    health = [rest for word, rest in rows if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/health/ready" in health[0]
    entry = json.loads(next(rest for word, rest in rows if word == "ENTRYPOINT"))
    # exec form: the server is PID 1; the entrypoint script is copied into the image
    assert entry == ["python3", "/usr/local/lib/torchship/entrypoint.py", "serve"]
    assert ("COPY", f"deploy/docker/entrypoint.py {entry[1]}") in rows
    cmd = json.loads(next(rest for word, rest in rows if word == "CMD"))
    args = build_parser().parse_args(["serve", *cmd])
    assert args.config == "/etc/torchship/serve.yaml"
    assert ("STOPSIGNAL", "SIGTERM") in rows
    assert any(word == "EXPOSE" and rest == "8000" for word, rest in rows)


def test_dockerignore_keeps_exactly_what_the_repo_root_build_copies() -> None:
    """Every COPY from the build context exists at the repo root and is re-included by the
    .dockerignore, which starts by excluding everything."""
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [line for line in ignore if line and not line.startswith("#")]
    assert ignore[0] == "*"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            sources += rest.split()[:-1]
    assert sources
    for src in sources:
        src = src.rstrip("/")
        assert (ROOT / src).exists(), src
        assert src in included, f"{src} is copied but .dockerignore leaves it out"


# --- Kubernetes ------------------------------------------------------------------------------


def test_kubernetes_manifests_pass_strict_schema_validation() -> None:
    kv = tool("kubernetes-validate")
    assert len(K8S_RESOURCES) >= 6
    proc = subprocess.run(
        [kv, "--strict", *map(str, K8S_RESOURCES)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in K8S_RESOURCES:
        assert f"{path.relative_to(ROOT)} passed" in proc.stdout or str(path) in proc.stdout


def test_strict_validation_rejects_what_kubernetes_would(tmp_path: Path) -> None:
    kv = tool("kubernetes-validate")
    deployment = load(K8S / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # typo
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    proc = subprocess.run([kv, "--strict", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0, proc.stdout


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("path", [K8S / "deployment.yaml", K8S / "gpu" / "deployment.yaml"])
def test_deployment_matches_the_server_and_the_image(path: Path, routes: set[str]) -> None:
    doc = load(path)
    pod = doc["spec"]["template"]["spec"]
    c = _container(doc)
    env = {e["name"]: e.get("value") for e in c["env"]}
    port = next(p for p in c["ports"] if p["name"] == "http")["containerPort"]
    assert str(port) == env["TORCHSHIP_PORT"] and env["TORCHSHIP_HOST"] == "0.0.0.0"
    for probe, path_ in (
        ("startupProbe", "/health/ready"),
        ("readinessProbe", "/health/ready"),
        ("livenessProbe", "/health/live"),
    ):
        assert c[probe]["httpGet"]["path"] == path_ and path_ in routes
    # the image's user, no root, nothing writable but /tmp
    user = next(rest for word, rest in reversed(dockerfile_instructions()) if word == "USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/etc/torchship"}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # preStop, then the server's drain, fit in the grace period
    config = yaml.safe_load(load(K8S / "configmap.yaml")["data"]["serve.yaml"])
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config["graceful_timeout_s"]
    # the args are a valid `torchship serve` command line; labels reach the Service
    build_parser().parse_args(["serve", *c["args"]])
    labels = doc["spec"]["template"]["metadata"]["labels"]
    assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = load(K8S / "service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_configmap_holds_valid_server_settings() -> None:
    config = yaml.safe_load(load(K8S / "configmap.yaml")["data"]["serve.yaml"])
    settings = load_settings(cls=ServeSettings, **config)
    assert settings.models == ["digits"] and settings.worker_count() == 1


def test_hpa_pdb_and_kustomization_point_at_the_deployment() -> None:
    hpa, pdb = load(K8S / "hpa.yaml"), load(K8S / "pdb.yaml")
    deployment = load(K8S / "deployment.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (
        hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    listed = load(K8S / "kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_kserve_inference_service_uses_v2_on_the_torchship_runtime(routes: set[str]) -> None:
    """The CRDs are not in Kubernetes' schemas (kubernetes-validate cannot check them), so
    their structure is checked here, and the pod parts they embed against the real schemas."""
    import kubernetes_validate

    runtime = load(K8S / "kserve" / "servingruntime.yaml")
    isvc = load(K8S / "kserve" / "inferenceservice.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == (
        "serving.kserve.io/v1alpha1",
        "ServingRuntime",
    )
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {
        f["name"] for f in runtime["spec"]["supportedModelFormats"]
    }
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    # the runtime's args, with KServe's template filled in, are a torchship serve command
    # serving the InferenceService's name on the container's port
    args = [a.replace("{{.Name}}", isvc["metadata"]["name"]) for a in container["args"]]
    parsed = build_parser().parse_args(["serve", *args])
    assert parsed.models == [isvc["metadata"]["name"]] and parsed.store == "/mnt/models"
    assert parsed.port == container["ports"][0]["containerPort"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["path"].startswith("/v2/")
    assert "/v2/models/{name}/infer" in routes
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kserve-container-check"},
        "spec": {"containers": [container]},
    }
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


# --- compose, nginx, Prometheus, Grafana -------------------------------------------------------


def test_compose_wires_replicas_balancer_and_monitoring_together() -> None:
    compose = load(DEPLOY / "compose.yaml")
    services = compose["services"]
    app, nginx, prom, grafana = (
        services[k] for k in ("torchship", "nginx", "prometheus", "grafana")
    )
    # N replicas of the project's image, drained on stop
    assert app["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (DEPLOY / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == DOCKERFILE
    replicas = re.fullmatch(r"\$\{TORCHSHIP_REPLICAS:-(\d+)\}", str(app["deploy"]["replicas"]))
    assert replicas and int(replicas.group(1)) >= 2
    assert "/health/ready" in " ".join(app["healthcheck"]["test"])
    grace = int(app["stop_grace_period"].rstrip("s"))
    assert grace > float(app["environment"]["TORCHSHIP_GRACEFUL_TIMEOUT_S"])
    assert app["read_only"] is True and app["user"].startswith("10001")
    # every host path mounted exists
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    # nginx: the file the load-balancer test runs, upstream = the service name and port
    assert "./nginx/torchship.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    conf = (DEPLOY / "nginx" / "torchship.conf").read_text()
    assert re.search(r"^\s*server torchship:8000 ", conf, re.M)
    assert "least_conn;" in conf and "max_fails=" in conf and "non_idempotent" in conf
    assert nginx["depends_on"]["torchship"]["condition"] == "service_healthy"
    # replicas trust X-Forwarded-For from nginx's fixed address only, inside the subnet
    nginx_ip = nginx["networks"]["default"]["ipv4_address"]
    assert app["environment"]["TORCHSHIP_TRUSTED_PROXIES"] == nginx_ip
    subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(nginx_ip) in ipaddress.ip_network(subnet)
    assert "networks" not in app  # on the same default network as nginx
    # Prometheus scrapes every replica (DNS service discovery of the service name)
    scrape = load(DEPLOY / "monitoring" / "prometheus.yml")
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "torchship")
    assert job["dns_sd_configs"][0]["names"] == ["torchship"]
    assert job["dns_sd_configs"][0]["port"] == 8000
    assert "./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    for rules in scrape["rule_files"]:  # mounted beside the config, where it looks for them
        assert f"./monitoring/{rules}:/etc/prometheus/{rules}:ro" in prom["volumes"]
    # Grafana: provisioning and dashboards where the provisioning files expect them
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith(".")
    )
    providers = load(DEPLOY / "monitoring/grafana/provisioning/dashboards/torchship.yaml")
    dash_path = providers["providers"][0]["options"]["path"]
    assert mounts["./monitoring/grafana/dashboards"] == dash_path
    assert list((DEPLOY / "monitoring/grafana/dashboards").glob("*.json"))
    datasources = load(DEPLOY / "monitoring/grafana/provisioning/datasources/prometheus.yaml")
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in services


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus, or make system-deps)")
    proc = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "monitoring" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
