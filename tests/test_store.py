from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from torchship.errors import (
    IntegrityError,
    InvalidInputError,
    InvalidNameError,
    ModelLoadError,
    ModelNotFoundError,
    UntrustedPickleError,
    VersionExistsError,
    VersionNotFoundError,
)
from torchship.store import Architecture, ModelStore, TorchVersionWarning
from torchship.store.serialization import ArchitectureWarning, safe_torch_load
from torchship.zoo import digits

MARKER_CODE = "import pathlib; pathlib.Path({marker!r}).write_text('pwned')"


class _Evil:
    """Unpickling this runs code: exactly what a malicious .pt file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (MARKER_CODE.format(marker=str(self.marker)),))


def _save_mlp(store: ModelStore, model: torch.nn.Module, data: digits.DigitsData, **kw):  # type: ignore[no-untyped-def]
    return store.save(
        model,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        metrics={"test_accuracy": 0.5},
        examples=data.x_test[:16],
        **kw,
    )


def test_save_load_roundtrip_state_dict(store, quick_mlp, digits_data) -> None:
    manifest = _save_mlp(store, quick_mlp, digits_data)
    assert manifest.version == "1"
    assert manifest.artifacts["weights"].format == "safetensors"
    assert set(manifest.files) == {"weights.safetensors", "examples.safetensors"}
    assert manifest.torch_version == torch.__version__
    assert manifest.architecture is not None
    assert manifest.architecture.target == "torchship.zoo.digits:DigitsMLP"

    loaded = store.load("digits")
    assert not loaded.training, "loaded models must be in eval mode"
    x = digits_data.x_test[:8]
    quick_mlp.eval()
    assert torch.equal(loaded(x), quick_mlp(x))
    assert torch.equal(store.load_examples("digits"), digits_data.x_test[:16])

    on_disk = json.loads((store.path("digits", "1") / "manifest.json").read_text())
    assert on_disk["labels"] == digits.LABELS
    assert on_disk["input"]["shape"] == [1, 8, 8]


def test_versions_aliases_latest_and_delete(store, quick_mlp, digits_data) -> None:
    for _ in range(3):
        _save_mlp(store, quick_mlp, digits_data)
    assert store.versions("digits") == ["1", "2", "3"]
    assert store.resolve("digits") == "3"
    assert store.manifest("digits:latest").version == "3"
    store.set_alias("digits", "production", "2")
    assert store.manifest("digits:production").version == "2"
    assert store.aliases("digits") == {"production": "2"}

    with pytest.raises(InvalidInputError, match="aliased as production"):
        store.delete("digits:2")
    store.delete("digits:3")
    assert store.versions("digits") == ["1", "2"]
    # the next auto version never reuses a live number and never collides
    assert _save_mlp(store, quick_mlp, digits_data).version == "3"
    store.delete("digits:2", force=True)
    assert "production" not in store.aliases("digits")

    with pytest.raises(VersionExistsError):
        _save_mlp(store, quick_mlp, digits_data, version="1")
    assert _save_mlp(store, quick_mlp, digits_data, version="v2-rc1").version == "v2-rc1"


def test_missing_model_and_version_errors_list_what_exists(store, quick_mlp, digits_data) -> None:
    _save_mlp(store, quick_mlp, digits_data, aliases=["production"])
    with pytest.raises(VersionNotFoundError) as err:
        store.manifest("digits:7")
    assert "Versions: 1" in str(err.value) and "production" in str(err.value)
    assert err.value.status_code == 404
    with pytest.raises(ModelNotFoundError, match="digits"):
        store.manifest("cats")


@pytest.mark.parametrize(
    "bad", ["../etc", "a/b", "..", ".hidden", "", "x" * 65, "a\\b", "name with space", "latest"]
)
def test_bad_names_are_refused(store, quick_mlp, bad) -> None:
    with pytest.raises(InvalidNameError):
        store.save(quick_mlp, bad)
    with pytest.raises(InvalidNameError):
        store.manifest(bad or "x:", None if bad else "../x")
    assert not (store.root.parent / "etc").exists()


def test_bad_version_and_alias_names_are_refused(store, quick_mlp, digits_data) -> None:
    _save_mlp(store, quick_mlp, digits_data)
    with pytest.raises(InvalidNameError):
        store.save(quick_mlp, "digits", version="../../x")
    with pytest.raises(InvalidNameError):
        store.set_alias("digits", "../prod", "1")
    with pytest.raises(InvalidNameError):
        store.manifest("digits:../1")


def test_tampered_file_fails_checksum(store, quick_mlp, digits_data) -> None:
    _save_mlp(store, quick_mlp, digits_data)
    weights = store.path("digits", "1") / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its recorded checksum"):
        store.load("digits")
    weights.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.load("digits")


def test_whole_model_pickle_needs_explicit_trust(store, quick_mlp, digits_data) -> None:
    manifest = _save_mlp(store, quick_mlp, digits_data, format="whole")
    assert manifest.artifacts["weights"].format == "pickle"
    with pytest.raises(UntrustedPickleError) as err:
        store.load("digits")
    assert "trust_pickle=True" in str(err.value)
    loaded = store.load("digits", trust_pickle=True)
    x = digits_data.x_test[:4]
    assert torch.equal(loaded(x), quick_mlp.eval()(x))


def test_malicious_pickle_is_refused_and_never_executed(
    tmp_path, store, quick_mlp, digits_data
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Evil(marker)}, evil)

    with pytest.raises(UntrustedPickleError, match="refused"):
        safe_torch_load(evil)
    assert not marker.exists()

    # The same payload planted as a whole-model version of the store.
    _save_mlp(store, quick_mlp, digits_data, format="whole")
    vdir = store.path("digits", "1")
    (vdir / "model.pt").write_bytes(evil.read_bytes())
    with pytest.raises(IntegrityError):  # the swap breaks the recorded checksum
        store.load("digits")
    from torchship.store._atomic import sha256_file
    from torchship.store.manifest import FileEntry

    def forge(m):  # type: ignore[no-untyped-def]  # an attacker who also rewrites the manifest
        m.files["model.pt"] = FileEntry(sha256=sha256_file(vdir / "model.pt"), size=1)

    store.update_manifest("digits:1", forge)
    with pytest.raises(UntrustedPickleError):
        store.load("digits")
    assert not marker.exists(), "the malicious pickle was executed"
    store.update_manifest("digits:1", lambda m: m.files.pop("model.pt"))
    with pytest.raises(IntegrityError, match="not covered by the manifest's checksums"):
        store.load("digits")


def test_architecture_must_be_an_nn_module(store, quick_mlp, digits_data) -> None:
    with pytest.warns(ArchitectureWarning, match="not an nn.Module"):
        _save_mlp(
            store,
            quick_mlp,
            digits_data,
            architecture=Architecture(target="os:system", kwargs={"command": "true"}),
        )
    with pytest.raises(ModelLoadError, match="not an nn.Module"):
        store.load("digits")
    # passing the instance to fill works without trusting the recorded target
    loaded = store.load("digits", model=digits.DigitsMLP(**quick_mlp.init_kwargs))
    assert not loaded.training


def test_torch_version_mismatch_warns(store, quick_mlp, digits_data) -> None:
    _save_mlp(store, quick_mlp, digits_data)
    store.update_manifest("digits:1", lambda m: setattr(m, "torch_version", "1.13.1"))
    with pytest.warns(TorchVersionWarning, match="saved with torch 1.13.1"):
        store.load("digits")
    store.update_manifest("digits:1", lambda m: setattr(m, "torch_version", torch.__version__))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TorchVersionWarning)
        store.load("digits")


def test_device_mapping(store, quick_mlp, digits_data) -> None:
    _save_mlp(store, quick_mlp, digits_data)
    model = store.load("digits", device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    auto = store.load("digits", device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(auto.parameters()).device.type == expected


SAVER = textwrap.dedent(
    """
    import sys, torch
    from torchship.store import ModelStore
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
    store = ModelStore(sys.argv[1])
    print("ready", flush=True)
    while True:
        store.save(model, "big")
    """
)


@pytest.mark.filterwarnings("ignore::torchship.store.serialization.ArchitectureWarning")
def test_killed_save_never_leaves_a_version_that_looks_complete(tmp_path) -> None:
    root = tmp_path / "models"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    delays = [0.0, 0.013, 0.029, 0.047, 0.071, 0.097, 0.131, 0.173, 0.23, 0.31]
    for delay in delays:
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(root)], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)  # varies the moment of the kill; synchronisation is the readline
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = ModelStore(root)
    versions = store.versions("big")
    visible = [p.name for p in (root / "big").iterdir() if not p.name.startswith(".")]
    assert sorted(visible, key=int) == sorted(versions, key=int), (
        "a folder without manifest is visible"
    )
    for version in versions:
        store.verify("big", version)  # every visible version is whole
    leftovers = [p.name for p in (root / "big").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "expected at least one interrupted save (the test should kill mid-write)"
    # the store keeps working after the crashes
    m = store.save(torch.nn.Linear(2, 2), "big")
    assert store.verify("big", m.version)


def test_saving_what_cannot_be_rebuilt_warns(store) -> None:
    with pytest.warns(ArchitectureWarning, match="different weights"):
        store.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), "seq")
    with pytest.raises(ModelLoadError, match="do not fit the architecture"):
        store.load("seq")
    assert store.load("seq", model=torch.nn.Sequential(torch.nn.Linear(2, 2))) is not None


def test_stages_promote_rollback_and_history(store, quick_mlp, digits_data) -> None:
    from torchship.errors import VersionNotFoundError as NotFound
    from torchship.store import stages

    for _ in range(3):
        _save_mlp(store, quick_mlp, digits_data)
    assert stages.stages(store, "digits") == {"1": "staging", "2": "staging", "3": "staging"}
    assert store.resolve("digits") == "3"  # no production yet: the newest
    with pytest.raises(NotFound):
        stages.rollback(store, "digits")
    stages.promote(store, "digits", "1", reason="first release")
    assert store.resolve("digits") == "1"  # the default pointer
    stages.promote(store, "digits", "2", reason="better accuracy")
    assert stages.stages(store, "digits") == {"1": "archived", "2": "production", "3": "staging"}
    record = stages.rollback(store, "digits", reason="p99 regression")
    assert (record["from"], record["to"]) == ("2", "1")
    assert store.resolve("digits") == "1"
    assert stages.stages(store, "digits")["2"] == "archived"
    stages.rollback(store, "digits", to="3", reason="hotfix")
    assert store.resolve("digits") == "3"
    log = stages.history(store, "digits")
    assert [r["action"] for r in log] == ["promote", "promote", "rollback", "rollback"]
    assert [r["reason"] for r in log] == [
        "first release",
        "better accuracy",
        "p99 regression",
        "hotfix",
    ]
    assert all("at" in r for r in log)
    with pytest.raises(InvalidInputError):
        stages.rollback(store, "digits", to="3")
    # promoting what is already in production changes nothing a rollback relies on
    stages.promote(store, "digits", "2", reason="v2")
    stages.promote(store, "digits", "2", reason="again")
    assert stages.rollback(store, "digits", reason="undo")["to"] == "3"


def test_manifests_cannot_point_outside_their_folder(
    store, quick_mlp, digits_data, tmp_path
) -> None:
    _save_mlp(store, quick_mlp, digits_data)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((store.path("digits", "1") / "weights.safetensors").read_bytes())

    def escape(m):  # type: ignore[no-untyped-def]
        m.artifacts["weights"].file = str(outside)

    with pytest.raises(InvalidNameError):
        store.update_manifest("digits:1", escape)
        store.load("digits")


def test_reserved_file_names_are_not_versions(store, quick_mlp) -> None:
    for bad in ("aliases.json", "policy.json", "history.jsonl", "stages.json"):
        with pytest.raises(InvalidNameError):
            store.save(quick_mlp, "digits", version=bad)


def test_stage_operations_validate_names_before_touching_disk(store) -> None:
    from torchship.store import stages

    with pytest.raises(InvalidNameError):
        stages.rollback(store, "../escaped")
    with pytest.raises(ModelNotFoundError):
        stages.rollback(store, "ghost")
    assert not (store.root.parent / "escaped").exists()
    assert store.names() == []
