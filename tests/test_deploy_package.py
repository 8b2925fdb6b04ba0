"""``torchship package``: a verified, pinned, ready-to-build context for one model."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
import tomllib
import yaml
from deploy_utils import quick_digits_store
from serving_utils import ROOT

from torchship.cli import main
from torchship.deploy import pinned_requirements, write_package
from torchship.deploy.package import MARKER, package_tag
from torchship.errors import ConfigError, IntegrityError, ModelNotFoundError
from torchship.serving.settings import ServeSettings
from torchship.settings import load_settings
from torchship.store import ModelStore


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return quick_digits_store(tmp_path_factory.mktemp("pkg") / "models")


def test_the_context_has_everything_the_projects_dockerfile_needs(store, tmp_path: Path) -> None:
    info = write_package(store, "digits", tmp_path / "ctx", workers=2)
    ctx = info.path
    assert info.ref == "digits:1"
    assert (ctx / "Dockerfile").read_bytes() == (ROOT / "deploy/docker/Dockerfile").read_bytes()
    for name in ("pyproject.toml", "README.md", "requirements.txt", ".dockerignore", "DEPLOY.md"):
        assert (ctx / name).is_file(), name
    assert (ctx / "src/torchship/serving/runner.py").is_file()
    assert not list(ctx.rglob("__pycache__"))
    # the model: verified, aliased, readable by the image's non-root user
    packaged = ModelStore(ctx / "models")
    assert packaged.names() == ["digits"] and packaged.versions("digits") == ["1"]
    packaged.verify("digits", "1")
    assert packaged.resolve("digits") == "1"
    for f in (ctx / "models/digits/1").iterdir():
        assert f.stat().st_mode & stat.S_IROTH, f
    record = json.loads((ctx / MARKER).read_text())
    assert record["model"] == "digits" and record["version"] == "1"
    assert record["files"] == info.files and len(info.files) >= 1
    assert package_tag(ctx) == info.default_tag() == "torchship-digits:1"  # image build's
    assert package_tag(tmp_path) is None
    # the server config the image starts with
    config = yaml.safe_load((ctx / "configs/serve.yaml").read_text())
    settings = load_settings(cls=ServeSettings, **config)
    assert settings.models == ["digits:1"] and settings.workers == 2


def test_requirements_are_pinned_and_cover_the_core_dependencies(store, tmp_path: Path) -> None:
    info = write_package(store, "digits:1", tmp_path / "ctx")
    lines = [
        line
        for line in (info.path / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines == info.requirements
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^=+\s]+", line) for line in lines), lines
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in lines}
    assert len(pinned) == len(lines)  # no package twice
    assert "torch==2.13.0" in lines  # the local build label (+cpu) is the Dockerfile's job
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = [re.split(r"[<>=\[]", dep)[0].lower() for dep in project["dependencies"]]
    assert set(core) <= pinned
    assert "torchship" not in pinned
    assert "pytest" not in pinned  # a dev tool, not something the server runs
    assert "scikit-learn" not in pinned and "scipy" not in pinned  # the train extra


def test_a_tampered_model_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    store = quick_digits_store(tmp_path / "models")
    weights = store.path("digits", "1") / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityError):
        write_package(store, "digits", tmp_path / "ctx")
    assert not (tmp_path / "ctx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ctx")]


def test_bad_requests_are_refused_clearly(store, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        write_package(store, "nope", tmp_path / "a")
    with pytest.raises(ConfigError, match="Unknown serve settings"):
        write_package(store, "digits", tmp_path / "b", replicas=3)
    with pytest.raises(ConfigError, match="Invalid settings"):
        write_package(store, "digits", tmp_path / "c", framework="django")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an earlier package"):
        write_package(store, "digits", other, force=True)
    assert (other / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_force_replaces_an_earlier_package(store, tmp_path: Path) -> None:
    write_package(store, "digits", tmp_path / "ctx", framework="flask")
    with pytest.raises(ConfigError, match="--force"):
        write_package(store, "digits", tmp_path / "ctx")
    write_package(store, "digits", tmp_path / "ctx", force=True)
    config = yaml.safe_load((tmp_path / "ctx/configs/serve.yaml").read_text())
    assert "framework" not in config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]


def test_cli_package(store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ctx"
    code = main(["package", "--store", str(store.root), "--model", "digits", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "packaged digits:1" in printed and "docker build" in printed
    assert (out / "Dockerfile").is_file()
    code = main(
        ["package", "--store", str(store.root), "--model", "ghost", "--out", str(out) + "2"]
    )
    assert code == 2
    assert "ghost" in capsys.readouterr().err


def test_pinned_requirements_follow_extras() -> None:
    plain = pinned_requirements()
    names = {p.split("==")[0].lower() for p in plain}
    assert "fastapi" in names and "uvicorn" in names
    # uvicorn[standard] is a core requirement: its extras' packages are pinned too
    assert "uvloop" in names or "httptools" in names
