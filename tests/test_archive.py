"""TorchServe model archives: building, safe reading, and native serving (no Java).

Real tiny digits models; archives built by torchship and by torch-model-archiver; the
FastAPI and Flask apps in-process, and one real server on loopback sockets.
"""

from __future__ import annotations

import gzip
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from archive_utils import (
    BASE_HANDLER_SOURCE,
    DIGIT_PNG,
    HANDLERS,
    MANIFEST_PATH,
    digits_store,
    manifest_bytes,
    model_archiver,
    png_of_digit,
    raw_tar_header,
    symlink_entry,
    tar_entry,
    write_tgz,
    write_zip,
)
from fastapi.testclient import TestClient
from serving_utils import free_port, run_server

from torchship.archive import (
    ArchiveError,
    ArchiveLimits,
    ArchiveTooLargeError,
    ModelConfig,
    UnsafeArchiveError,
    build_archive,
    extract_archive,
    inspect_archive,
)
from torchship.archive.sources import find_archives
from torchship.serving.fastapi_app import create_app
from torchship.serving.settings import ServeSettings
from torchship.store import ModelStore
from torchship.zoo import digits

MGMT = 18181  # the in-process apps' management port (no socket is bound)


@pytest.fixture(scope="module")
def workspace(
    tmp_path_factory: pytest.TempPathFactory,
    quick_mlp: torch.nn.Module,
    digits_data: digits.DigitsData,
) -> tuple[ModelStore, Path]:
    root = tmp_path_factory.mktemp("archives")
    store = digits_store(root, quick_mlp, digits_data)
    model_store = root / "model_store"
    cfg = ModelConfig(batch_size=8, max_batch_delay_ms=2)
    build_archive(
        store, "digits", handler="image", export_path=model_store, model_name="img", config=cfg
    )
    build_archive(
        store,
        "digits",
        handler="tensor",
        export_path=model_store,
        model_name="tens",
        runtime="eager",
    )
    build_archive(
        store,
        "digits",
        handler="tensor",
        export_path=model_store,
        model_name="tens",
        version="2",
        runtime="torchscript",
        overwrite=True,
    )
    (model_store / "tens.mar").rename(model_store / "tens_v2.mar")
    build_archive(
        store,
        "digits",
        handler="tensor",
        export_path=model_store,
        model_name="tens",
        runtime="eager",
    )
    handler = root / "json_digits.py"
    handler.write_text(BASE_HANDLER_SOURCE)
    model_archiver(store, model_store, "tma_base", "1.0", handler)
    model_archiver(store, model_store, "tma_image", "1.0", HANDLERS / "digits_image.py")
    return store, model_store


@pytest.fixture(scope="module")
def client(workspace: tuple[ModelStore, Path]) -> Iterator[TestClient]:
    store, model_store = workspace
    settings = ServeSettings(
        store=store.root,
        models=["digits", "img.mar", "tens=tens.mar", "tma_base.mar", "tma_image=tma_image.mar"],
        model_store=model_store,
        management_port=MGMT,
        warmup=False,
        runtime="torchscript",
    )
    with TestClient(create_app(settings, load_in_background=False)) as c:
        yield c


@pytest.fixture(scope="module")
def admin(client: TestClient) -> TestClient:
    """The same app, called on its management port (lifespan already run by ``client``)."""
    return TestClient(client.app, base_url=f"http://testserver:{MGMT}")


# --- building -------------------------------------------------------------------------------


def test_built_archive_is_what_torchserve_expects(workspace: tuple[ModelStore, Path]) -> None:
    _, model_store = workspace
    with zipfile.ZipFile(model_store / "img.mar") as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read(MANIFEST_PATH))
        config = zf.read("model-config.yaml").decode()
    assert names == {
        "model.pt",
        "digits_image.py",
        "index_to_name.json",
        "torchship.json",
        "model-config.yaml",
        MANIFEST_PATH,
    }
    assert manifest["runtime"] == "python"
    assert manifest["model"] == {
        "modelName": "img",
        "serializedFile": "model.pt",
        "handler": "digits_image.py",
        "modelVersion": "1",
        "configFile": "model-config.yaml",
    }
    assert "batchSize: 8" in config and "maxBatchDelay: 2" in config
    eager = inspect_archive(model_store / "tens.mar").manifest.model
    assert (eager.model_file, eager.handler) == ("model.py", "tensor.py")


def test_build_refuses_what_would_not_work(
    workspace: tuple[ModelStore, Path], tmp_path: Path
) -> None:
    store, model_store = workspace
    with pytest.raises(ArchiveError, match="already exists"):
        build_archive(store, "digits", handler="image", export_path=model_store, model_name="img")
    with pytest.raises(ArchiveError, match="neither a shipped handler"):
        build_archive(store, "digits", handler="nope", export_path=tmp_path)
    with pytest.raises(ArchiveError, match="max_workers cannot be less"):
        ModelConfig(min_workers=2, max_workers=1)


def test_archives_from_torch_model_archiver_are_read(workspace: tuple[ModelStore, Path]) -> None:
    _, model_store = workspace
    info = inspect_archive(model_store / "tma_base.mar")
    assert info.manifest.model.model_name == "tma_base"
    assert info.manifest.archiver_version == "0.12.0"
    assert {"model.pt", "json_digits.py", "index_to_name.json"} <= info.files


# --- safe reading ---------------------------------------------------------------------------

HOSTILE = {
    "zip-slip": ([("../escaped.py", b"x")], UnsafeArchiveError, "outside the archive"),
    "absolute": ([("/tmp/abs.py", b"x")], UnsafeArchiveError, "absolute path"),
    "backslash": ([("..\\win.py", b"x")], UnsafeArchiveError, "backslash"),
    "symlink": ([symlink_entry("handler.py", "/etc/passwd")], UnsafeArchiveError, "symbolic link"),
    "bomb": ([("model.pt", bytes(4 << 20))], ArchiveTooLargeError, "decompression bomb"),
    "duplicate": ([("a.txt", b"1"), ("a.txt", b"2")], UnsafeArchiveError, "twice"),
}


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_leave_nothing(case: str, tmp_path: Path) -> None:
    entries, error, message = HOSTILE[case]
    path = write_zip(tmp_path / f"{case}.mar", [*entries, (MANIFEST_PATH, manifest_bytes())])
    with pytest.raises(error, match=message) as info:
        extract_archive(path, tmp_path / "out")
    assert 400 <= info.value.status_code < 500
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "escaped.py").exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folder left


def test_limits_manifest_and_references_are_checked(tmp_path: Path) -> None:
    many = write_zip(tmp_path / "many.mar", [(f"f{i}", b"") for i in range(5)])
    with pytest.raises(ArchiveTooLargeError, match="entries"):
        inspect_archive(many, ArchiveLimits(max_entries=3))
    big = write_zip(tmp_path / "big.mar", [("a", b"x" * 5000), (MANIFEST_PATH, manifest_bytes())])
    with pytest.raises(ArchiveTooLargeError, match="unpacks to more than"):
        inspect_archive(big, ArchiveLimits(max_total_bytes=1000))
    none = write_zip(tmp_path / "none.mar", [("handler.py", b"")])
    with pytest.raises(ArchiveError, match="no MAR-INF/MANIFEST.json"):
        inspect_archive(none)
    bad = write_zip(tmp_path / "bad.mar", [(MANIFEST_PATH, b"{not json")])
    with pytest.raises(ArchiveError, match="not a valid TorchServe manifest"):
        inspect_archive(bad)
    missing = write_zip(
        tmp_path / "missing.mar", [(MANIFEST_PATH, manifest_bytes(serializedFile="model.pt"))]
    )
    with pytest.raises(ArchiveError, match="serializedFile 'model.pt' is not in the archive"):
        inspect_archive(missing)
    (tmp_path / "text.mar").write_text("not a zip")
    with pytest.raises(ArchiveError, match="not a readable zip"):
        inspect_archive(tmp_path / "text.mar")


TGZ_HOSTILE = {
    "tar-slip": ([("../escaped.py", b"x")], UnsafeArchiveError, "outside the archive"),
    "absolute": ([("/tmp/abs.py", b"x")], UnsafeArchiveError, "absolute path"),
    "symlink": (
        [tar_entry("m/handler.py", tarfile.SYMTYPE, "/etc/passwd")],
        UnsafeArchiveError,
        "symbolic link",
    ),
    "hardlink": (
        [tar_entry("m/handler.py", tarfile.LNKTYPE, "/etc/passwd")],
        UnsafeArchiveError,
        "hard link",
    ),
    "fifo": ([tar_entry("m/pipe", tarfile.FIFOTYPE)], UnsafeArchiveError, "not a regular file"),
    "bomb": ([("m/model.pt", bytes(8 << 20))], ArchiveTooLargeError, "decompression bomb"),
    "duplicate": ([("m/a.txt", b"1"), ("m/a.txt", b"2")], UnsafeArchiveError, "twice"),
}


# Headers that declare huge data (none follows: refused before it would be read)
TGZ_HEADERS = {
    "pax header bomb": (tarfile.XHDTYPE, ArchiveTooLargeError, "at most"),
    "long-name bomb": (tarfile.GNUTYPE_LONGNAME, ArchiveTooLargeError, "at most"),
    "sparse file": (tarfile.GNUTYPE_SPARSE, UnsafeArchiveError, "sparse file"),
    "unknown type": (b"Z", UnsafeArchiveError, "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(TGZ_HEADERS))
def test_tar_headers_are_judged_before_their_data_is_read(case: str, tmp_path: Path) -> None:
    kind, error, message = TGZ_HEADERS[case]
    path = tmp_path / "h.tar.gz"
    path.write_bytes(gzip.compress(raw_tar_header("m/x", kind, 8 << 30)))
    with pytest.raises(error, match=message):
        inspect_archive(path)


@pytest.mark.parametrize("case", sorted(TGZ_HOSTILE))
def test_hostile_tgz_archives_are_refused_and_leave_nothing(case: str, tmp_path: Path) -> None:
    entries, error, message = TGZ_HOSTILE[case]
    manifest = (f"m/{MANIFEST_PATH}", manifest_bytes())
    path = write_tgz(tmp_path / f"{case}.tar.gz", [*entries, manifest])
    with pytest.raises(error, match=message) as info:
        extract_archive(path, tmp_path / "out")
    assert 400 <= info.value.status_code < 500
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing written
    assert not (tmp_path.parent / "escaped.py").exists()


def test_tgz_and_folder_layouts_and_limits(tmp_path: Path) -> None:
    # torch-model-archiver's tgz keeps everything under MODEL_NAME/: read as the top level
    good = write_tgz(
        tmp_path / "m.tar.gz",
        [
            ("m/handler.py", b"# handler"),
            ("m/sub/extra.txt", b"x"),
            (f"m/{MANIFEST_PATH}", manifest_bytes()),
        ],
    )
    info = extract_archive(good, tmp_path / "out")
    assert info.format == "tgz" and info.files == {"handler.py", "sub/extra.txt", MANIFEST_PATH}
    assert (tmp_path / "out" / "sub" / "extra.txt").read_bytes() == b"x"
    with pytest.raises(ArchiveTooLargeError, match="unpacks to more than"):
        inspect_archive(good, ArchiveLimits(max_total_bytes=10))
    with pytest.raises(ArchiveTooLargeError, match="entries"):
        inspect_archive(good, ArchiveLimits(max_entries=2))
    # a folder (no-archive): read in place, links refused, hashed by names and contents
    folder = tmp_path / "out"
    info = inspect_archive(folder)
    assert info.format == "folder" and info.files == {"handler.py", "sub/extra.txt", MANIFEST_PATH}
    assert info.sha256 == inspect_archive(folder).sha256
    (folder / "sub" / "extra.txt").write_bytes(b"y")
    changed = inspect_archive(folder).sha256
    assert changed != info.sha256
    # the same bytes split over files otherwise hash otherwise
    (folder / "handler.py").write_bytes(b"# handlersub/extra.txt\x00y")
    (folder / "sub" / "extra.txt").unlink()
    assert inspect_archive(folder).sha256 != changed
    (folder / "sub" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_archive(folder, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    # a file and a folder of the same name; `tar -C folder .`'s "./" entry is fine
    clash = write_tgz(
        tmp_path / "c.tar.gz", [("a", b"1"), ("a/b", b"2"), (MANIFEST_PATH, manifest_bytes())]
    )
    with pytest.raises(UnsafeArchiveError, match="collides"):
        extract_archive(clash, tmp_path / "clash")
    dot = tarfile.TarInfo(".")
    dot.type = tarfile.DIRTYPE
    rooted = write_tgz(
        tmp_path / "dot.tar.gz",
        [(dot, b""), ("./handler.py", b"#"), (f"./{MANIFEST_PATH}", manifest_bytes())],
    )
    assert inspect_archive(rooted).files == {"handler.py", MANIFEST_PATH}
    (tmp_path / "not.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(ArchiveError, match="not a readable .tar.gz|corrupt"):
        inspect_archive(tmp_path / "not.tar.gz")


def test_a_folder_changed_while_it_is_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the scan and the copy, a file swapped for a FIFO (which would block the
    open) or a folder swapped for a link elsewhere: refused, nothing read from outside."""
    import os

    from torchship.archive import sources

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not for the model")
    folder = tmp_path / "m"
    (folder / "MAR-INF").mkdir(parents=True)
    (folder / MANIFEST_PATH).write_bytes(manifest_bytes())
    (folder / "handler.py").write_text("#")
    (folder / "sub").mkdir()
    (folder / "sub" / "secret").write_text("x" * 17)
    scan = sources.FolderSource.members

    def swap_after_scan(self: sources.FolderSource, limits: ArchiveLimits) -> list[sources.Member]:
        found = scan(self, limits)
        (folder / "handler.py").unlink()
        os.mkfifo(folder / "handler.py")
        (folder / "sub" / "secret").unlink()
        (folder / "sub").rmdir()
        (folder / "sub").symlink_to(outside)
        return found

    monkeypatch.setattr(sources.FolderSource, "members", swap_after_scan)
    with pytest.raises(UnsafeArchiveError, match="changed while it was read"):
        extract_archive(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tgz_and_no_archive_formats_serve_like_the_mar(
    workspace: tuple[ModelStore, Path], tmp_path: Path
) -> None:
    """The three formats torch-model-archiver writes, served from one model store:
    same answers, and the management API registers them too."""
    store, _ = workspace
    formats = tmp_path / "model_store"
    for fmt in ("default", "tgz", "no-archive"):
        model_archiver(
            store, formats, f"img_{fmt.replace('-', '_')}", "1.0", HANDLERS / "digits_image.py", fmt
        )
    found = find_archives(formats)
    assert found == ["img_default.mar", "img_no_archive=img_no_archive", "img_tgz.tar.gz"]
    settings = ServeSettings(
        store=store.root,
        models=found,  # what --models all serves
        model_store=formats,
        management_port=MGMT,
        warmup=False,
    )
    png = DIGIT_PNG.read_bytes()
    with TestClient(create_app(settings, load_in_background=False)) as c:
        admin = TestClient(c.app, base_url=f"http://testserver:{MGMT}")
        answers = []
        for name in ("img_default", "img_tgz", "img_no_archive"):
            r = c.post(f"/predictions/{name}", content=png, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            answers.append(r.json())
        assert answers[0] == answers[1] == answers[2] and max(answers[0], key=answers[0].get) == "7"
        # registered at run time under other names: a .tar.gz and a folder
        for url, name in (("img_tgz.tar.gz", "t2"), ("img_no_archive", "d2")):
            r = admin.post(f"/models?url={url}&model_name={name}&initial_workers=1")
            assert r.status_code == 200, r.text
            r = c.post(f"/predictions/{name}", content=png, headers={"content-type": "image/png"})
            assert r.json() == answers[0]
        r = admin.post("/models?url=../img_no_archive&model_name=x")
        assert r.status_code == 404


# --- native serving: TorchServe's inference API -----------------------------------------------


def test_archives_answer_like_the_store_model(
    client: TestClient, digits_data: digits.DigitsData
) -> None:
    x = digits_data.x_test[:4]
    png = png_of_digit(x[0])
    store_answer = client.post(
        "/predictions/digits", content=png, headers={"content-type": "image/png"}
    ).json()
    answers = {}
    for name in ("img", "tma_image"):
        r = client.post(f"/predictions/{name}", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.headers["x-model-name"] == name
        answers[name] = r.json()
        assert list(answers[name]) == list(store_answer)  # the same top-5 labels, in order
        assert answers[name] == pytest.approx(store_answer, abs=1e-5)
    form = client.post("/predictions/img", files={"data": ("d.png", png, "image/png")})
    assert form.json() == answers["img"]
    store_many = client.post("/predictions/digits", json={"inputs": x.tolist()}).json()
    many = client.post("/predictions/tens", json={"inputs": x.tolist()}).json()
    assert len(many) == 4
    for got, want in zip(many, store_many, strict=True):
        assert list(got) == list(want) and got == pytest.approx(want, abs=1e-5)
    one = client.post("/predictions/tens", json={"inputs": x[0].tolist()}).json()
    assert one == many[0]


def test_base_handler_archive_from_torch_model_archiver(
    client: TestClient, digits_data: digits.DigitsData
) -> None:
    x = digits_data.x_test[:16]
    expected = client.post("/predictions/tens", json={"inputs": x.tolist()}).json()
    for i in range(len(x)):
        got = client.post("/predictions/tma_base", json={"inputs": x[i].tolist()}).json()
        assert list(got) == [max(expected[i], key=expected[i].get)]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(client: TestClient) -> None:
    png = DIGIT_PNG.read_bytes()
    r = client.post(
        "/predictions/img", content=b"not an image", headers={"content-type": "image/png"}
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_image"
    r = client.post("/predictions/tens", json={"inputs": [1, 2]})
    assert r.status_code == 400 and "shape" in r.json()["error"]
    r = client.post("/predict?model=img", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 400 and "/predictions/img" in r.json()["hint"]
    assert client.post("/predictions/nope", content=png).status_code == 404
    r = client.post("/predictions/img", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200 and max(r.json(), key=r.json().get) == "7"


def test_one_bad_request_does_not_fail_its_batch(client: TestClient) -> None:
    png = DIGIT_PNG.read_bytes()
    bodies = [png, b"garbage"] * 6
    results: list[int] = [0] * len(bodies)

    def send(i: int) -> None:
        r = client.post(
            "/predictions/img", content=bodies[i], headers={"content-type": "image/png"}
        )
        results[i] = r.status_code

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 400] * 6


def test_torchserve_routes_are_not_on_the_inference_port(client: TestClient) -> None:
    assert client.get("/models/img").status_code == 404
    assert client.get("/manage/torchserve/models").status_code == 404
    assert "models" in client.get("/models").json()  # torchship's own list stays


# --- native serving: TorchServe's management API ------------------------------------------------


def test_list_and_describe(admin: TestClient) -> None:
    listed = admin.get("/models").json()
    names = [m["modelName"] for m in listed["models"]]
    assert names == sorted(names) and {"img", "tens", "digits", "tma_base"} <= set(names)
    assert {"modelName": "img", "modelUrl": "img.mar"} in listed["models"]
    page = admin.get("/models", params={"limit": 2}).json()
    assert len(page["models"]) == 2 and page["nextPageToken"] == "2"
    rest = admin.get("/models", params={"limit": 2, "next_page_token": 2}).json()
    assert rest["models"][0]["modelName"] == names[2]
    assert admin.get("/models", params={"limit": "x"}).status_code == 400
    [img] = admin.get("/models/img").json()
    assert (img["modelVersion"], img["batchSize"], img["maxBatchDelay"]) == ("1", 8, 2)
    assert img["workers"][0]["status"] == "READY" and img["minWorkers"] == 1
    assert admin.get("/models/nope").status_code == 404
    assert admin.get("/models/img/9.9").status_code == 404


def test_register_scale_set_default_unregister(admin: TestClient, client: TestClient) -> None:
    r = admin.post("/models", params={"url": "tens_v2.mar", "initial_workers": 1})
    assert r.status_code == 200
    assert r.json() == {"status": 'Model "tens" Version: 2 registered with 1 initial workers'}
    assert admin.post("/models", params={"url": "tens_v2.mar"}).status_code == 409
    assert [v["modelVersion"] for v in admin.get("/models/tens/all").json()] == ["1", "2"]

    r = admin.put("/models/tens/2", params={"min_worker": 2, "synchronous": "true"})
    assert (
        r.status_code == 200
        and r.json()["status"] == "Workers scaled to 2 for model: tens, version: 2"
    )
    [v2] = admin.get("/models/tens/2").json()
    assert len(v2["workers"]) == 2
    assert admin.put("/models/tens/2", params={"min_worker": 3, "max_worker": 1}).status_code == 400
    # refused before a 202 would promise it: out of range, or a "synchronous" not a bool
    assert admin.put("/models/tens/2", params={"min_worker": 100000}).status_code == 400
    r = admin.put("/models/tens/2", params={"min_worker": 1, "synchronous": "maybe"})
    assert r.status_code == 400 and "true or false" in r.json()["error"]
    assert admin.put("/models/digits", params={"min_worker": 2}).status_code == 400

    x = [[[0.0] * 8] * 8]
    assert client.post("/predictions/tens", json={"inputs": x}).headers["x-model-version"] == "1"
    r = admin.put("/models/tens/2/set-default")
    assert r.json() == {"status": 'Default version successfully updated for model "tens" to "2"'}
    assert client.post("/predictions/tens", json={"inputs": x}).headers["x-model-version"] == "2"
    assert admin.put("/models/tens/7/set-default").status_code == 404

    assert admin.delete("/models/tens/2").status_code == 403  # the default
    assert admin.delete("/models/tens/1").json() == {"status": 'Model "tens" unregistered'}
    r = admin.post("/models", params={"url": "tens_v2.mar", "model_name": "spare"})
    assert "registered with 0 initial workers. Use scale workers API" in r.json()["status"]
    assert client.post("/predictions/spare", json={"inputs": x}).status_code == 503
    assert admin.put("/models/spare", params={"min_worker": 1}).status_code == 202
    assert admin.delete("/models/spare").status_code == 200  # the last version: model goes
    assert "spare" not in [m["modelName"] for m in admin.get("/models").json()["models"]]
    assert client.post("/predictions/spare", json={"inputs": x}).status_code == 404
    assert admin.delete("/models/digits").status_code == 409  # store models stay


def test_registration_refuses_unsafe_archives_and_urls(
    admin: TestClient, client: TestClient, workspace: tuple[ModelStore, Path]
) -> None:
    _, model_store = workspace
    write_zip(model_store / "slip.mar", [("../../x.py", b"x"), (MANIFEST_PATH, manifest_bytes())])
    write_zip(
        model_store / "link.mar",
        [symlink_entry("handler.py", "/etc/passwd"), (MANIFEST_PATH, manifest_bytes())],
    )
    write_zip(
        model_store / "bomb.mar", [("model.pt", bytes(8 << 20)), (MANIFEST_PATH, manifest_bytes())]
    )
    for url, status in (("slip.mar", 422), ("link.mar", 422), ("bomb.mar", 413)):
        r = admin.post("/models", params={"url": url})
        assert r.status_code == status, r.text
        assert r.json()["code"] in ("unsafe_archive", "archive_too_large")
    assert admin.post("/models", params={"url": "../secret.mar"}).status_code == 404
    assert admin.post("/models", params={"url": "/etc/passwd"}).status_code == 404
    assert admin.post("/models", params={"url": "missing.mar"}).status_code == 404
    assert admin.post("/models").status_code == 400
    r = admin.post("/models", params={"url": "http://127.0.0.1:9/x.mar"})
    assert r.status_code == 403 and "allow_url_registration" in r.json()["hint"]
    assert admin.post("/models", params={"url": "file:///etc/x.mar"}).status_code == 400
    png = DIGIT_PNG.read_bytes()
    r = client.post("/predictions/img", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200


def test_flask_front_end_serves_archives_and_both_apis(workspace: tuple[ModelStore, Path]) -> None:
    from torchship.serving.flask_app import create_app as create_flask

    store, model_store = workspace
    settings = ServeSettings(
        store=store.root,
        models=["img.mar"],
        model_store=model_store,
        management_port=MGMT,
        framework="flask",
    )
    app = create_flask(settings, load_in_background=False)
    c = app.test_client()
    try:
        png = DIGIT_PNG.read_bytes()
        r = c.post("/predictions/img", data=png, content_type="image/png")
        assert r.status_code == 200 and max(r.json, key=r.json.get) == "7"
        r = c.post("/predictions/img", data={"data": (DIGIT_PNG.open("rb"), "d.png", "image/png")})
        assert r.status_code == 200
        assert c.post("/predictions/img", data=b"x", content_type="image/png").status_code == 400
        mg = f"http://localhost:{MGMT}"
        assert c.get("/models", base_url=mg).json == {
            "models": [{"modelName": "img", "modelUrl": "img.mar"}]
        }
        assert c.get("/models/img", base_url=mg).json[0]["modelVersion"] == "1"
        assert c.get("/models/img").status_code == 404  # not on the inference port
    finally:
        app.extensions["torchship"].stop()


def test_torchserve_handler_class_serves_a_store_model(
    workspace: tuple[ModelStore, Path], digits_data: digits.DigitsData
) -> None:
    from torchship.serving.payloads import TensorPayload
    from torchship.serving.service import InferenceService

    store, _ = workspace
    settings = ServeSettings(
        store=store.root,
        models=["digits"],
        handlers={"digits": f"{HANDLERS / 'tensor.py'}:TensorHandler"},
        warmup=False,
    )
    service = InferenceService(settings).start()
    try:
        result = service.predict(TensorPayload(digits_data.x_test[:3].numpy()), model="digits")
        assert len(result.predictions) == 3
        assert all(len(p) == 5 for p in result.predictions)  # {label: probability}, top 5
    finally:
        service.stop()


# --- a real server -------------------------------------------------------------------------------


def test_serve_started_the_torchserve_way(workspace: tuple[ModelStore, Path]) -> None:
    store, model_store = workspace
    mport = free_port()
    png = DIGIT_PNG.read_bytes()
    with run_server(
        store.root,
        "--model-store",
        str(model_store),
        "--models",
        "img=img.mar",
        "tens.mar",
        "--management-port",
        str(mport),
    ) as (base, _proc):
        assert requests.get(f"{base}/ping", timeout=10).json() == {"status": "Healthy"}
        r = requests.post(
            f"{base}/predictions/img", data=png, headers={"Content-Type": "image/png"}, timeout=30
        )
        assert r.status_code == 200 and max(r.json(), key=r.json().get) == "7"
        r = requests.post(
            f"{base}/predictions/img", data=b"x", headers={"Content-Type": "image/png"}, timeout=30
        )
        assert r.status_code == 400
        m = f"http://127.0.0.1:{mport}"
        models = requests.get(f"{m}/models", timeout=10).json()["models"]
        assert [x["modelName"] for x in models] == ["img", "tens"]
        assert requests.get(f"{base}/models/img", timeout=10).status_code == 404
        r = requests.post(
            f"{m}/models", params={"url": "tma_image.mar", "initial_workers": 1}, timeout=60
        )
        assert r.status_code == 200, r.text
        r = requests.post(
            f"{base}/predictions/tma_image",
            data=png,
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        assert r.status_code == 200 and max(r.json(), key=r.json().get) == "7"


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_archive_inspect_and_serve_flags(
    workspace: tuple[ModelStore, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchship.cli import build_parser, main
    from torchship.cli.serve_cmds import _archive_specs

    store, model_store = workspace
    out = tmp_path / "out"
    code = main(
        [
            "archive",
            "--store",
            str(store.root),
            "--model",
            "digits",
            "--handler",
            "tensor",
            "--export-path",
            str(out),
            "--batch-size",
            "4",
            "--runtime",
            "eager",
        ]
    )
    assert code == 0
    assert "Wrote" in capsys.readouterr().out
    assert inspect_archive(out / "digits.mar").manifest.model.model_file == "model.py"
    assert main(["archive", "--inspect", str(out / "digits.mar")]) == 0
    assert "MAR-INF/MANIFEST.json" in capsys.readouterr().out
    assert main(["archive", "--inspect", str(tmp_path / "missing.mar")]) == 2
    args = build_parser().parse_args(
        ["serve", "--model-store", str(model_store), "--models", "all", "--model", "digits"]
    )
    specs = _archive_specs(args)
    assert "img.mar" in specs and "tma_base.mar" in specs
    args = build_parser().parse_args(["serve", "--models", "digits"])
    with pytest.raises(Exception, match="NAME=FILE.mar"):
        _archive_specs(args)


def test_torchserve_management_needs_the_admin_scope_when_auth_is_on(
    workspace: tuple[ModelStore, Path],
) -> None:
    store, model_store = workspace
    admin_key, app_key = "a" * 32, "b" * 32
    settings = ServeSettings(
        store=store.root,
        models=["img.mar"],
        model_store=model_store,
        management_port=MGMT,
        api_keys=[f"ops:admin:{admin_key}", f"app:inference:{app_key}"],
    )
    with TestClient(create_app(settings, load_in_background=False)) as c:
        m = TestClient(c.app, base_url=f"http://testserver:{MGMT}")
        assert m.get("/models").status_code == 401
        assert m.get("/models", headers={"X-API-Key": app_key}).status_code == 403
        r = m.get("/models", headers={"X-API-Key": admin_key})
        assert r.json() == {"models": [{"modelName": "img", "modelUrl": "img.mar"}]}
        png = DIGIT_PNG.read_bytes()
        r = c.post("/predictions/img", content=png, headers={"X-API-Key": app_key})
        assert r.status_code == 200


FUNCTION_HANDLER = """
class PredictionException(Exception):  # as TorchServe's, which handlers raise for a status
    def __init__(self, message, error_code=500):
        super().__init__(message)
        self.message = message
        self.error_code = error_code


def handle(data, context):
    if data is None:  # TorchServe initialises function entry points with handle(None, ctx)
        return None
    out = []
    for i, row in enumerate(data):
        body = row.get("body")
        mode = body.get("mode") if isinstance(body, dict) else None
        if mode == "teapot":
            raise PredictionException("I am a teapot", 418)
        if mode == "short":
            return []
        if mode == "created":
            context.set_response_status(201, "made", i)
            context.set_response_header(i, "x-made", "yes")
            out.append("made")
        else:
            out.append({"echo": body, "query": row.get("k"), "model": context.model_name})
    return out
"""


def test_function_entry_point_statuses_and_handler_errors(tmp_path: Path) -> None:
    store = tmp_path / "model_store"
    store.mkdir()
    write_zip(
        store / "fn.mar",
        [
            ("fn_handler.py", FUNCTION_HANDLER.encode()),
            (MANIFEST_PATH, manifest_bytes("fn", "fn_handler:handle")),
        ],
    )
    settings = ServeSettings(store=tmp_path / "models", models=["fn.mar"], model_store=store)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        r = c.post("/predictions/fn?k=v", json={"x": 1})
        assert r.status_code == 200
        assert r.json() == {"echo": {"x": 1}, "query": "v", "model": "fn"}
        assert r.headers["x-model-version"] == "1.0"  # TorchServe's default version
        r = c.post("/predictions/fn", json={"mode": "created"})
        assert (r.status_code, r.text, r.headers["x-made"]) == (201, "made", "yes")
        assert r.headers["content-type"].startswith("text/plain")
        r = c.post("/predictions/fn", json={"mode": "teapot"})
        assert r.status_code == 418 and r.json()["error"] == "I am a teapot"
        r = c.post("/predictions/fn", json={"mode": "short"})
        assert r.status_code == 500 and r.json()["code"] == "inference_error"
        r = c.post(
            "/predictions/fn",
            content=b"raw bytes",
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 500  # bytearray is not JSON: the handler's answer cannot be sent
        assert c.post("/predictions/fn", json={"x": 2}).json()["echo"] == {"x": 2}


METRICS_HANDLER = """
import time


class Dimension:  # what ts.metrics.dimension.Dimension is: a name and a value
    def __init__(self, name, value):
        self.name, self.value = name, value


class MetricTypes:  # stands in for TorchServe's enum: members with .value
    class _T:
        def __init__(self, value):
            self.value = value
    COUNTER, GAUGE, HISTOGRAM = _T("counter"), _T("gauge"), _T("histogram")


def handle(data, context):
    m = context.metrics
    if data is None:  # initialise: declare a metric the TorchServe 0.8+ way
        m.add_metric_to_cache("ImagesSeen", "count", ["Source"], MetricTypes.COUNTER)
        return None
    started = time.perf_counter()
    out = []
    for row in data:
        body = row.get("body") or {}
        source = str(body.get("source", "web"))
        m.get_metric("ImagesSeen", MetricTypes.COUNTER).add_or_update(1, [source])
        m.add_metric("Score", float(body.get("score", 0.5)), "ratio", None, [], MetricTypes.HISTOGRAM)
        if body.get("bad"):
            m.add_counter("Images Seen", -1)  # not a valid counter step: dropped, logged
            m.add_time("HandlerTime", 1.0, None, "ms", [Dimension("Source", source)])  # new dims
        out.append({"ok": True})
    m.add_time("HandlerTime", (time.perf_counter() - started) * 1000, None, "ms",
               [Dimension("ModelName", context.model_name), Dimension("Level", "Model")])
    m.add_size("OutputSize", 0.25, None, "kB")
    return out
"""


def test_handler_metrics_are_exported_with_the_model_and_never_fail_a_request(
    tmp_path: Path,
) -> None:
    store = tmp_path / "model_store"
    store.mkdir()
    write_zip(
        store / "m.mar",
        [
            ("m_handler.py", METRICS_HANDLER.encode()),
            (MANIFEST_PATH, manifest_bytes("m", "m_handler:handle", modelVersion="2.0")),
        ],
    )
    settings = ServeSettings(store=tmp_path / "models", models=["m.mar"], model_store=store)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        for body in ({"source": "web"}, {"source": "app", "score": 0.9}, {"source": "web"}):
            assert c.post("/predictions/m", json=body).status_code == 200
        # a handler that misuses metrics still answers
        assert c.post("/predictions/m", json={"bad": True, "source": "web"}).status_code == 200
        text = c.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    series = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("torchship_handler_")
    }

    def value(name: str, **labels: str) -> float:
        return series[(name, tuple(sorted({"model": "m", "version": "2.0", **labels}.items())))]

    assert value("torchship_handler_ImagesSeen_total", Source="web") == 3
    assert value("torchship_handler_ImagesSeen_total", Source="app") == 1
    assert value("torchship_handler_Score_count") == 4
    assert value("torchship_handler_Score_sum") == pytest.approx(2.4)
    # TorchServe's own default dimensions (ModelName, Level) become the model label
    assert value("torchship_handler_HandlerTime") >= 0
    assert value("torchship_handler_OutputSize") == 0.25
    assert "# HELP torchship_handler_HandlerTime Handler metric 'HandlerTime' (ms)." in text
    # misuse is dropped, not raised: a negative counter step; the same name with new
    # dimensions (HandlerTime keeps the shape of its first use)
    assert not any(name.startswith("torchship_handler_Images_Seen") for name, _ in series)
    assert [labels for name, labels in series if name == "torchship_handler_HandlerTime"] == [
        (("model", "m"), ("version", "2.0"))
    ]


def test_handler_metrics_api_checks_what_torchserve_checks() -> None:
    from torchship.torchserve.contract import HandlerMetrics, MetricNotFoundError

    seen: list[tuple[str, str, str, dict[str, str], float]] = []
    m = HandlerMetrics("digits", lambda *args: seen.append(args))
    with pytest.raises(ValueError, match="unit of a time metric"):
        m.add_time("t", 1.0, unit="h")
    with pytest.raises(ValueError, match="unit of a size metric"):
        m.add_size("s", 1.0, unit="TB")
    with pytest.raises(MetricNotFoundError):
        m.get_metric("never_added")
    cached = m.add_metric_to_cache("requests", "count", ["route"])
    cached.add_or_update(1, [])  # the wrong number of values: logged and dropped, as there
    cached.add_or_update(2, ["/a"])
    m.add_counter("requests_plain", 1, dimensions=[("model", "x"), ("le", "0.5")])
    m.add_counter("requests_plain", "many")  # not a number: dropped
    m.add_counter("clash", 1, dimensions={"a-b": "1", "a_b": "2"})  # one label twice: dropped
    assert seen == [
        ("counter", "requests", "count", {"route": "/a"}, 2.0),
        ("counter", "requests_plain", "count", {"dim_model": "x", "dim_le": "0.5"}, 1.0),
    ]
    assert m.values == {"requests": 2.0, "requests_plain": 1.0, "clash": 1.0}
    # as in TorchServe, add_time & co. cache the metric, so get_metric finds it afterwards
    m.add_time("latency", 3.0, None, "ms", [("route", "/a")])
    m.get_metric("latency", "gauge").add_or_update(4.0, ["/b"])
    assert seen[-1] == ("gauge", "latency", "ms", {"route": "/b"}, 4.0)


def test_handler_metric_families_and_series_are_capped() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from torchship.serving.custom_metrics import MAX_FAMILIES, MAX_SERIES, CustomMetrics

    registry = CollectorRegistry()
    custom = CustomMetrics(registry)
    for i in range(MAX_SERIES + 10):  # e.g. a request id put into a dimension
        custom.record("counter", "hits", "", {"model": "m", "request": str(i)}, 1)
    for i in range(MAX_FAMILIES + 10):
        custom.record("gauge", f"g{i}", "", {"model": "m"}, float(i))
    custom.record("gauge", "other_model", "", {"model": "n"}, 1.0)  # the cap is per model
    with pytest.raises(ValueError, match="kind"):
        custom.record("summary", "s", "", {}, 1)
    text = generate_latest(registry).decode()
    assert text.count("torchship_handler_hits_total{") == MAX_SERIES
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    names = {f.removesuffix("_created").removesuffix("_total") for f in families}
    assert len(names) == MAX_FAMILIES + 1 and "torchship_handler_other_model" in names


def test_handler_metrics_keep_one_shape_per_name_and_drop_what_would_break_it() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from torchship.serving.custom_metrics import CustomMetrics

    registry = CollectorRegistry()
    custom = CustomMetrics(registry)
    m = {"model": "m", "version": "1"}
    custom.record("counter", "a", "", {**m, "x": "1", "y": "2"}, 1)
    custom.record("counter", "a", "", {"y": "2", **m, "x": "1"}, 2)  # same labels, other order
    custom.record("counter", "a", "", {**m, "x": "1"}, 1)  # other dimensions: dropped
    custom.record("gauge", "a", "", {**m, "x": "1", "y": "2"}, 1)  # other type: dropped
    custom.record("counter", "a", "", {**m, "x": "1", "y": "2"}, float("nan"))  # dropped
    custom.record("gauge", "a_total", "", m, 5)  # would write the counter's series: dropped
    custom.record("histogram", "t", "ms", m, 150.0)  # milliseconds get millisecond buckets
    custom.record("gauge", "g", "", {"model": "m", "version": "2"}, 7.0)
    custom.record("gauge", "g", "", m, 8.0)
    custom.forget(model="m", version="2")  # an unloaded version's series go
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
        if not s.name.endswith("_created")
    }
    labels = tuple(sorted({**m, "x": "1", "y": "2"}.items()))
    assert samples[("torchship_handler_a_total", labels)] == 3.0
    assert not [
        k for k in samples if k[0].startswith("torchship_handler_a_total") and k[1] != labels
    ]
    assert not any(k[0] == "torchship_handler_a" for k in samples)
    bucket = tuple(sorted({**m, "le": "250.0"}.items()))
    assert samples[("torchship_handler_t_bucket", bucket)] == 1.0
    assert [k for k in samples if k[0] == "torchship_handler_g"] == [
        ("torchship_handler_g", tuple(sorted(m.items())))
    ]


SHAPE_WORKER = """
import logging, os, sys
from pathlib import Path
from prometheus_client import CollectorRegistry
from torchship.serving.custom_metrics import CustomMetrics

logging.basicConfig(level=logging.WARNING)
custom = CustomMetrics(CollectorRegistry(), Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
for spec in sys.argv[1:]:
    kind, name, dims = spec.split(":")
    labels = {"model": "m", "version": "1", **{d: "x" for d in dims.split(",") if d}}
    custom.record(kind, name, "", labels, 5.0)
"""


def test_worker_processes_keep_one_shape_per_handler_metric(tmp_path: Path) -> None:
    """Two worker processes whose handlers disagree on a metric: the first shape wins in
    both, so the merged scrape holds each name once (two types under one name would make
    Prometheus refuse the scrape)."""
    import os
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.parser import text_string_to_metric_families

    from torchship.serving.metrics import prepare_multiprocess_dir

    folder = tmp_path / "metrics"
    prepare_multiprocess_dir(folder)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}

    def worker(*specs: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", SHAPE_WORKER, *specs],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert worker("gauge:load:", "counter:hits:route") == ""
    warned = worker("counter:load:", "counter:hits:path", "counter:hits2:")
    assert "another worker process made it a gauge" in warned
    assert "with labels ['model', 'route', 'version']" in warned
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(folder))
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    assert families["torchship_handler_load"].type == "gauge"
    assert [s.value for s in families["torchship_handler_load"].samples] == [5.0]
    assert "torchship_handler_load_total" not in {
        s.name for f in families.values() for s in f.samples
    }
    (hits,) = families["torchship_handler_hits"].samples
    assert hits.labels == {"model": "m", "version": "1", "route": "x"} and hits.value == 5.0
    assert families["torchship_handler_hits2"].samples[0].value == 5.0
    prepare_multiprocess_dir(folder)  # a new server: shapes are free again
    assert worker("counter:load:") == ""


def test_an_archive_keeps_its_traffic_state_apart_from_a_store_model_of_its_name(
    workspace: tuple[ModelStore, Path], tmp_path: Path
) -> None:
    """`torchship archive --model digits` makes digits.mar; served alone, its set-default
    must not rewrite the store's digits policy (the next `serve --model digits` would
    restore a version the store does not have)."""
    import shutil

    store, _ = workspace
    root = Path(shutil.copytree(store.root, tmp_path / "models"))
    model_store = tmp_path / "model_store"
    build_archive(ModelStore(root), "digits", handler="image", export_path=model_store)
    build_archive(
        ModelStore(root), "digits", handler="image", export_path=model_store, version="2.0",
        overwrite=True,
    )  # fmt: skip
    (model_store / "digits.mar").rename(model_store / "digits_v2.mar")
    build_archive(ModelStore(root), "digits", handler="image", export_path=model_store)
    settings = ServeSettings(
        store=root,
        models=["digits=digits.mar", "digits=digits_v2.mar"],
        model_store=model_store,
        management_port=MGMT,
        warmup=False,
    )
    with TestClient(create_app(settings, load_in_background=False)) as c:
        admin = TestClient(c.app, base_url=f"http://testserver:{MGMT}")
        assert admin.put("/models/digits/2.0/set-default").status_code == 200
    assert not (root / "digits" / "policy.json").exists()
    assert json.loads((model_store / ".torchship" / "digits" / "policy.json").read_text())
