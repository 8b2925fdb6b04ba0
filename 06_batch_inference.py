"""Lesson 06 — Batch inference at scale.

What you will see:
  1. a folder of digit drawings (two of them deliberately corrupt) and a trained model;
  2. the naive loop (one file, one model call at a time) against torchship.batch: a
     DataLoader pipeline with batched model calls, a progress bar and a summary;
  3. the output: one row per input, in input order, failures with their reason;
  4. a run stopped part-way, as a crash would stop it, then resumed: every input ends up
     in the output exactly once;
  5. the same job from the command line, and on Ray Data for many machines.

Run: python 06_batch_inference.py   (offline, ~30 s)
"""

import json
import time

from rich.markup import escape

from torchship import batch
from torchship.demo import train_demo
from torchship.postprocess import top_k
from torchship.preprocessing import preprocess_image
from torchship.runtime import load_predictor
from torchship.store import ModelStore
from torchship.tutorial import say, section, table, workdir
from torchship.zoo import digits

work = workdir("lesson_06")

section("1. A model and a folder of 300 drawings")
store = ModelStore(work / "models")
manifest = train_demo(store, "digits", export=False)
say(f"{manifest.ref}: test accuracy {manifest.metrics['test_accuracy']:.2%}")
data = digits.load_digits_split()
images = work / "images"
for i in range(300):
    label = int(data.y_test[i])
    folder = images / str(label)  # the true digit, so we can check the answers later
    folder.mkdir(parents=True, exist_ok=True)
    drawing = digits.render_digit(data.raw_test[i], size=48, pen=i % 3 == 0)
    drawing.save(folder / f"{i:04d}.{'jpg' if i % 2 else 'png'}")
good = next((images / "3").glob("*.png")).read_bytes()
(images / "3" / "cut-off.png").write_bytes(good[: len(good) // 2])  # a truncated upload
(images / "notes.jpg").write_text("not a picture at all")
say(f"{sum(1 for p in images.rglob('*') if p.is_file())} files in {images}, 2 of them corrupt")

section("2. The naive loop vs torchship.batch")
predictor = load_predictor(store, "digits", runtime="eager")
spec = predictor.input_spec
assert spec is not None
files = sorted(p for p in images.rglob("*.png") if p.name != "cut-off.png")[:100]
start = time.perf_counter()
for path in files:  # read, preprocess, one model call, one answer: per file
    x = preprocess_image(path.read_bytes(), spec)
    top_k(predictor.predict(x[None]), predictor.labels, 3)
naive_rate = len(files) / (time.perf_counter() - start)
say(f"naive loop: {naive_rate:,.0f} images/s (and the first corrupt file would crash it)")
summary = batch.run(
    "digits",
    images,
    work / "predictions.csv",
    store=store,
    runtime="eager",
    batch_size=64,
    progress=True,  # a bar with rate and ETA; by default only on a terminal
)
say(f"torchship.batch: {summary}")
say(f"how it ran: {summary.plan or f'{summary.num_workers} workers'}")
say(f"{summary.items_per_s / naive_rate:.1f}x the naive loop, and no crash on bad files")

section("3. One row per input, in input order")
rows = batch.read_rows(summary.output)
table(
    "predictions.csv (first rows)",
    ["index", "id", "status", "label_1", "probability_1", "label_2"],
    [
        [r.index, r.id, r.status, r.labels[0], f"{r.probabilities[0]:.3f}", r.labels[1]]
        for r in rows[:4]
    ],
)
table(
    "failure rows: the reason instead of a crash",
    ["index", "id", "status", "error"],
    [[r.index, r.id, r.status, r.error] for r in rows if r.status == "error"],
)
ok = [r for r in rows if r.status == "ok"]
right = sum(r.labels[0] == r.id.split("/")[0] for r in ok)
say(
    f"accuracy on the drawings (folder name = true digit): {right}/{len(ok)} = {right / len(ok):.1%}"
)

section("4. Stopped part-way, then resumed")
output = work / "resumable.jsonl"
first = batch.run(
    "digits", images, output, store=store, runtime="eager", stop_after=150, chunk_size=50
)
say(f"first run: {first}")
parts = output.with_name(output.name + ".parts")
journal = json.loads((parts / "journal.json").read_text())
say(
    f"{parts.name}/ holds {len(journal['parts'])} committed chunks "
    f"({', '.join(journal['parts'])}); journal.json says {journal['committed']} rows are safe"
)
say(
    "Each chunk is written to a temp file, fsynced and renamed, then the journal is updated "
    "the same way: a kill -9 at any moment loses at most the chunk being written."
)
second = batch.run("digits", images, output, store=store, runtime="eager", resume=True)
say(f"resumed:   {second}")
resumed = batch.read_rows(output)
indices = [r.index for r in resumed]
say(f"every input exactly once: {indices == list(range(summary.total))}")
say(
    "same answers as the uninterrupted run: "
    f"{[(r.id, r.labels[:1]) for r in resumed] == [(r.id, r.labels[:1]) for r in rows]}"
)

section("5. The same from the command line, and on many machines")
store_arg = f"--store {store.root}"
say(f"torchship batch {store_arg} --model digits --input {images} --output {work}/preds.parquet")
say("   ... killed? run the same command again with --resume")
say(
    f"torchship batch {store_arg} --model digits --input {images} "
    f"--output {work}/preds.csv --engine ray"
)
say(
    "   Ray Data runs the same preprocessing and model on an actor pool "
    + escape("(pip install 'torchship[ray]') ")
    + "on a local Ray started for the job, or an existing cluster (--ray-address auto)."
)
