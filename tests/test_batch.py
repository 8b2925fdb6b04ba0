"""Offline batch inference with a really trained digits model and real files: every input
kind, every output format, corrupt inputs, order, resume after a real SIGKILL, Ray, CLI."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from torchship import batch
from torchship.batch import sources
from torchship.batch.plan import Costs, choose
from torchship.batch.progress import Progress
from torchship.batch.writers import JOURNAL, ChunkedOutput, Row, parts_dir, read_rows
from torchship.cli import main
from torchship.errors import ConfigError, MissingDependencyError
from torchship.store import ModelStore
from torchship.zoo import digits

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 40


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A digits CNN trained for a few epochs: real predictions, no exports (eager only)."""
    data = digits.load_digits_split()
    model = digits.train("cnn", epochs=6, data=data).model
    store = ModelStore(tmp_path_factory.mktemp("batch") / "models")
    store.save(
        model,
        "digits",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=data.x_test[:16],
    )
    return store


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Drawings in folders named by their true digit, plus corrupt and ignored files."""
    data = digits.load_digits_split()
    root = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        label = int(data.y_test[i])
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        img = digits.render_digit(data.raw_test[i], size=32)
        img.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (root / "3" / "truncated.png").write_bytes(
        (root / "3").glob("*.png").__next__().read_bytes()[:60]
    )
    (root / "not-an-image.jpg").write_bytes(b"hello, I am text")
    (root / "README.txt").write_text("ignored: not an image")
    (root / ".hidden.png").write_bytes(b"ignored: hidden")
    return root


def run(store: ModelStore, inputs: Path, output: Path, **kwargs: object) -> batch.BatchSummary:
    options: dict[str, object] = {"runtime": "eager", "progress": False, "batch_size": 8}
    return batch.run("digits", inputs, output, store=store, **(options | kwargs))  # type: ignore[arg-type]


def true_label(row: Row) -> str:
    return row.id.split("/")[0]


# --- image folders, formats, failures -----------------------------------------------


def test_folder_rows_in_input_order_with_failure_rows(
    model_store: ModelStore, images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="torchship.batch"):
        summary = run(model_store, images, tmp_path / "out.csv")
    assert "1 other file ignored: not images or .npy" in caplog.text  # README.txt, said
    rows = read_rows(tmp_path / "out.csv")
    assert summary.complete and summary.total == N_IMAGES + 2 == len(rows)
    assert summary.items == len(rows) and summary.failures == 2 and summary.skipped == 0
    assert [r.index for r in rows] == list(range(len(rows)))
    assert [r.id for r in rows] == sorted(r.id for r in rows)  # sorted relative paths
    failed = {r.id: r.error or "" for r in rows if r.status == "error"}
    assert set(failed) == {"3/truncated.png", "not-an-image.jpg"}
    assert "truncated or corrupt" in failed["3/truncated.png"]
    assert "not an image" in failed["not-an-image.jpg"]
    ok = [r for r in rows if r.status == "ok"]
    assert all(
        len(r.labels) == 3 and list(r.probabilities) == sorted(r.probabilities, reverse=True)
        for r in ok
    )
    accuracy = sum(r.labels[0] == true_label(r) for r in ok) / len(ok)
    assert accuracy >= 0.9, accuracy
    assert f"-> {tmp_path / 'out.csv'}" in str(summary) and "items/s" in str(summary)
    assert not parts_dir(tmp_path / "out.csv").exists()  # merged and cleaned up


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_every_format_holds_the_same_rows(
    model_store: ModelStore, images: Path, tmp_path: Path, suffix: str
) -> None:
    run(model_store, images, tmp_path / "ref.csv")
    run(model_store, images, tmp_path / f"out{suffix}", top_k=2)
    reference = read_rows(tmp_path / "ref.csv")
    rows = read_rows(tmp_path / f"out{suffix}")
    assert [(r.index, r.id, r.status, r.error) for r in rows] == [
        (r.index, r.id, r.status, r.error) for r in reference
    ]
    assert [r.labels for r in rows] == [r.labels[:2] for r in reference]


def test_loader_workers_give_the_same_rows(
    model_store: ModelStore, images: Path, tmp_path: Path
) -> None:
    run(model_store, images, tmp_path / "w0.jsonl", num_workers=0)
    summary = run(model_store, images, tmp_path / "w2.jsonl", num_workers=2, batch_size=3)
    assert summary.num_workers == 2 and summary.threads == 1  # 2 cores: workers get them
    a, b = read_rows(tmp_path / "w0.jsonl"), read_rows(tmp_path / "w2.jsonl")
    assert [(r.id, r.status, r.labels) for r in a] == [(r.id, r.status, r.labels) for r in b]
    assert np.allclose(
        [r.probabilities for r in a if r.status == "ok"],
        [r.probabilities for r in b if r.status == "ok"],
        atol=1e-5,
    )


def test_auto_plan_is_measured_and_reported(
    model_store: ModelStore, images: Path, tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    summary = run(model_store, images, tmp_path / "auto.csv")
    assert torch.get_num_threads() == before  # the model's thread setting does not leak
    assert "measured per item: preprocessing" in summary.plan
    assert summary.num_workers == 0  # a tiny job: starting processes would cost more


def test_plan_gives_heavy_models_the_cores_and_costly_inputs_the_workers() -> None:
    # ResNet-18-like: 3 ms to decode a photo, 20 ms/item for the model on 2 cores, 36 on 1
    resnet = Costs(preprocess=0.003, model_all=0.020, model_one=0.036)
    assert choose(2, resnet, items=10_000)[0] == 0
    # ... but on a busy machine where two threads are slower than one, a worker pays off
    assert choose(2, Costs(0.003, 0.050, 0.036), items=10_000)[0] == 1
    # digits-like: 1 ms to preprocess a drawing, 0.05 ms/item for the model
    drawings = Costs(preprocess=0.001, model_all=0.00005, model_one=0.00008)
    assert choose(2, drawings, items=10_000)[0] == 2
    assert choose(8, drawings, items=10_000)[0] >= 4
    # under a second of work: not worth starting processes
    assert choose(2, drawings, items=200)[0] == 0


# --- every input kind -------------------------------------------------------------


def predicted(model_store: ModelStore, x: torch.Tensor) -> list[str]:
    model = model_store.load("digits")
    with torch.inference_mode():
        return [str(i) for i in model(x).argmax(1).tolist()]


def test_npy_and_npz_rows(model_store: ModelStore, tmp_path: Path) -> None:
    x = digits.load_digits_split().x_test[:12]
    np.save(tmp_path / "x.npy", x.numpy())
    np.savez(tmp_path / "x.npz", first=x[:5].numpy(), single=x[5].numpy(), rest=x[6:].numpy())
    expected = predicted(model_store, x)
    rows = read_rows(run(model_store, tmp_path / "x.npy", tmp_path / "npy.csv").output)
    assert [r.id for r in rows] == [str(i) for i in range(12)]
    assert [r.labels[0] for r in rows] == expected
    rows = read_rows(run(model_store, tmp_path / "x.npz", tmp_path / "npz.csv").output)
    assert [r.id for r in rows] == [
        *(f"first[{i}]" for i in range(5)),
        "single",
        *(f"rest[{i}]" for i in range(6)),
    ]
    assert [r.labels[0] for r in rows] == expected


def test_csv_listing_paths_tensors_and_features(
    model_store: ModelStore, images: Path, tmp_path: Path
) -> None:
    x = digits.load_digits_split().x_test[:3]
    png = next((images / "1").glob("*.png"))
    listing = [
        {"id": "a", "path": str(png), "input": ""},
        {"id": "b", "path": "", "input": json.dumps(x[0].tolist())},
        {"id": "c", "path": "missing.png", "input": ""},
        {"id": "d", "path": "", "input": json.dumps([[1.0, 2.0]])},  # wrong shape
    ]
    (tmp_path / "list.csv").write_text(_csv(listing))
    rows = read_rows(run(model_store, tmp_path / "list.csv", tmp_path / "out.jsonl").output)
    assert [r.id for r in rows] == ["a", "b", "c", "d"]
    assert [r.status for r in rows] == ["ok", "ok", "error", "error"]
    assert rows[1].labels[0] == predicted(model_store, x[:1])[0]
    assert "cannot read" in (rows[2].error or "") and "missing.png" in (rows[2].error or "")
    assert "Expected an input of shape [1, 8, 8]" in (rows[3].error or "")
    # no path or input column: the numeric columns are the features (8x8 = 64 of them)
    features = [
        {"id": f"r{i}", **{f"p{j}": float(v) for j, v in enumerate(x[i].flatten())}}
        for i in range(3)
    ]
    (tmp_path / "features.csv").write_text(_csv(features))
    rows = read_rows(run(model_store, tmp_path / "features.csv", tmp_path / "f.csv").output)
    assert [r.labels[0] for r in rows] == predicted(model_store, x)


def test_jsonl_listing_with_a_broken_line(
    model_store: ModelStore, images: Path, tmp_path: Path
) -> None:
    x = digits.load_digits_split().x_test[:2]
    png = next((images / "7").glob("*.png"))
    lines = [
        json.dumps({"id": "img", "path": os.path.relpath(png, tmp_path)}),
        "{not json",
        json.dumps({"input": x[1].tolist()}),
    ]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    rows = read_rows(run(model_store, tmp_path / "list.jsonl", tmp_path / "out.csv").output)
    assert [r.id for r in rows] == ["img", "line 2", "2"]
    assert [r.status for r in rows] == ["ok", "error", "ok"]
    assert rows[0].labels[0] == "7" and "JSONDecodeError" in (rows[1].error or "")
    assert rows[2].labels[0] == predicted(model_store, x[1:])[0]


def test_parquet_listing_paths_and_tensors(
    model_store: ModelStore, images: Path, tmp_path: Path
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    x = digits.load_digits_split().x_test[:30]
    table = pa.table({"id": [f"t{i}" for i in range(30)], "input": [t.tolist() for t in x]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)  # several row groups
    rows = read_rows(run(model_store, tmp_path / "t.parquet", tmp_path / "t.csv").output)
    assert [r.id for r in rows] == [f"t{i}" for i in range(30)]
    assert [r.labels[0] for r in rows] == predicted(model_store, x)
    pngs = sorted(images.glob("*/*.png"))[:4]
    pq.write_table(pa.table({"path": [str(p) for p in pngs]}), tmp_path / "p.parquet")
    rows = read_rows(run(model_store, tmp_path / "p.parquet", tmp_path / "p.csv").output)
    assert [r.status for r in rows] == ["ok"] * 4 and [r.id for r in rows] == ["0", "1", "2", "3"]


def test_missing_optional_dependencies_name_their_extra(
    monkeypatch: pytest.MonkeyPatch, model_store: ModelStore, images: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match="pyarrow") as info:
        run(model_store, images, tmp_path / "out.parquet")
    assert info.value.hint == "pip install 'torchship[parquet]'"
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match="ray") as info:
        run(model_store, images, tmp_path / "out.csv", engine="ray")
    assert info.value.hint == "pip install 'torchship[ray]'"


def test_bad_settings_and_unknown_inputs_are_clear(
    model_store: ModelStore, images: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        run(model_store, images, tmp_path / "o.csv", batch_size=0)
    with pytest.raises(ConfigError, match="does not exist"):
        run(model_store, tmp_path / "nowhere", tmp_path / "o.csv")
    with pytest.raises(ConfigError, match="output format"):
        run(model_store, images, tmp_path / "o.xlsx")
    (tmp_path / "data.bin").write_bytes(b"?")
    with pytest.raises(ConfigError, match="Cannot tell what"):
        sources.open_source(tmp_path / "data.bin")


# --- committed chunks and resume ----------------------------------------------------


def rows_for(indices: range) -> list[Row]:
    return [Row(i, f"item{i}", "ok", None, ("1",), (0.5,)) for i in indices]


def test_chunks_commit_in_order_and_resume_drops_uncommitted_parts(tmp_path: Path) -> None:
    out = tmp_path / "o.csv"
    job = {"inputs": "x", "model": "m:1", "top_k": 1}
    first = ChunkedOutput(out, job, top_k=1)
    first.commit(rows_for(range(0, 4)))
    with pytest.raises(RuntimeError, match="input order"):
        first.commit(rows_for(range(5, 6)))  # a gap would lose row 4
    first.commit(rows_for(range(4, 6)))
    (parts_dir(out) / "part-000002.csv").write_text("written, never journalled\n")
    (parts_dir(out) / ".part-000003.csv.abc.tmp").write_text("half-written\n")

    with pytest.raises(ConfigError, match="interrupted run"):
        ChunkedOutput(out, job, top_k=1)
    with pytest.raises(ConfigError, match="the job changed"):
        ChunkedOutput(out, {**job, "model": "m:2"}, top_k=1, resume=True)
    resumed = ChunkedOutput(out, job, top_k=1, resume=True)
    assert resumed.committed == 6
    assert sorted(p.name for p in parts_dir(out).iterdir()) == [
        JOURNAL,
        "part-000000.csv",
        "part-000001.csv",
    ]
    resumed.commit(rows_for(range(6, 9)))
    resumed.finish()
    assert [r.index for r in read_rows(out)] == list(range(9))
    with pytest.raises(ConfigError, match="already exists"):
        ChunkedOutput(out, job, top_k=1)
    assert ChunkedOutput(out, job, top_k=1, resume=True).already_complete


def test_stop_after_then_resume_is_exactly_once(
    model_store: ModelStore, images: Path, tmp_path: Path
) -> None:
    whole = read_rows(run(model_store, images, tmp_path / "whole.csv").output)
    out = tmp_path / "part.parquet"
    first = run(model_store, images, out, stop_after=17, chunk_size=5)
    assert not first.complete and first.items == 17 and not out.exists()
    assert "stopped at 17 of 42" in str(first)
    journal = json.loads((parts_dir(out) / JOURNAL).read_text())
    assert journal["committed"] == 17 and len(journal["parts"]) == 3  # whole batches: 8+8+1
    second = run(model_store, images, out, resume=True, chunk_size=5)
    assert second.complete and second.skipped == 17 and second.items == len(whole) - 17
    rows = read_rows(out)
    assert [(r.index, r.id, r.status, r.labels) for r in rows] == [
        (r.index, r.id, r.status, r.labels) for r in whole
    ]
    again = run(model_store, images, out, resume=True)
    assert again.complete and again.items == 0  # nothing left: a no-op
    with pytest.raises(ConfigError, match="complete with 42 rows, but the inputs now hold"):
        run(model_store, images / "3", out, resume=True)  # not the job that made it


def test_resume_after_sigkill_of_a_real_run(model_store: ModelStore, tmp_path: Path) -> None:
    """Kill ``torchship batch`` (and its loader worker) mid-run, resume, compare."""
    raw = digits.load_digits_split().raw_test
    inputs = tmp_path / "many"
    inputs.mkdir()
    for i in range(1500):
        digits.render_digit(raw[i % len(raw)], size=12).save(inputs / f"{i:05d}.png")
    out = tmp_path / "out.csv"
    cmd = [
        sys.executable, "-m", "torchship", "batch",
        "--store", str(model_store.root), "--model", "digits",
        "--input", str(inputs), "--output", str(out),
        "--runtime", "eager", "--batch-size", "8", "--chunk-size", "8",
        "--num-workers", "1", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    journal = parts_dir(out) / JOURNAL
    committed = 0
    try:
        deadline = time.monotonic() + 60
        while committed < 200:  # wait for progress on disk: a few dozen chunks committed
            assert proc.poll() is None, (
                f"exited early: {proc.stdout.read() if proc.stdout else ''!r}"
            )
            assert time.monotonic() < deadline, "no progress within 60 s"
            if journal.exists():
                committed = json.loads(journal.read_text())["committed"]
            time.sleep(0.005)  # polling interval only: the condition above is the sync
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its DataLoader worker, mid-chunk
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = json.loads(journal.read_text())["committed"]
    assert 200 <= at_kill < 1500 and not out.exists()

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{at_kill:,} resumed past" in resumed.stdout
    reference = read_rows(run(model_store, inputs, tmp_path / "ref.csv", batch_size=8).output)
    rows = read_rows(out)
    assert [r.index for r in rows] == list(range(1500))  # every input exactly once, in order
    assert [(r.id, r.status, r.labels) for r in rows] == [
        (r.id, r.status, r.labels) for r in reference
    ]
    assert np.allclose(
        [r.probabilities for r in rows], [r.probabilities for r in reference], atol=1e-5
    )
    assert not parts_dir(out).exists()


# --- progress and CLI -------------------------------------------------------------


def test_progress_bar_shows_rate_and_eta_on_a_terminal_only() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with Progress(100, 40, console=console) as bar:
        bar.advance(60)
    text = buffer.getvalue()
    assert "100/100" in text and "items/s" in text and "ETA" in text
    quiet = Console(file=io.StringIO())  # not a terminal
    assert not Progress(10, console=quiet).enabled


def test_cli_batch(
    model_store: ModelStore, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.jsonl"
    args = [
        "batch",
        "--store",
        str(model_store.root),
        "--model",
        "digits:1",
        "--input",
        str(images),
        "--output",
        str(out),
        "--runtime",
        "eager",
        "--top-k",
        "1",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "42 items (2 failed)" in printed and "items/s" in printed
    assert all(len(r.labels) <= 1 for r in read_rows(out))
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--stop-after", "10"]) == 0
    assert "stopped at 10 of 42" in " ".join(capsys.readouterr().out.split())
    assert main([*args, "--resume"]) == 0
    assert len(read_rows(out)) == 42
    assert main([a if a != "digits:1" else "nope" for a in args]) == 2
    assert "No model named 'nope'" in capsys.readouterr().err


# --- Ray ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_engine_gives_the_same_rows(
    model_store: ModelStore, images: Path, tmp_path: Path
) -> None:
    """``--engine ray`` on a local Ray with 2 CPUs and an actor pool of 2, in a subprocess
    (a hung cluster cannot hang the suite; the process exits only once Ray is down)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install 'torchship[ray]')")
    local = read_rows(run(model_store, images, tmp_path / "local.csv").output)
    out = tmp_path / "ray.jsonl"
    cmd = [
        sys.executable, "-m", "torchship", "batch", "--engine", "ray", "--num-workers", "2",
        "--store", str(model_store.root), "--model", "digits", "--runtime", "eager",
        "--input", str(images), "--output", str(out), "--batch-size", "8",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "42 items (2 failed)" in proc.stdout
    rows = read_rows(out)
    assert [(r.index, r.id, r.status, r.error, r.labels) for r in rows] == [
        (r.index, r.id, r.status, r.error, r.labels) for r in local
    ]


def _csv(rows: list[dict[str, object]]) -> str:
    import csv

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def test_prefetching_keeps_order_and_surfaces_errors() -> None:
    from torchship.batch.engine_local import _Prefetcher

    assert list(_Prefetcher(iter(range(100)), depth=2)) == list(range(100))

    def broken() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    got: list[int] = []
    with pytest.raises(OSError, match="disk gone"):
        for x in _Prefetcher(broken(), depth=2):
            got.append(x)
    assert got == [1]

    endless = _Prefetcher(itertools.count(), depth=2)  # consumer stops early: no leak
    assert next(iter(endless)) == 0
    endless.close()
    assert not endless._thread.is_alive()
