"""Lesson 05 — High-performance serving with FastAPI.

What you will see:
  1. the same InferenceService as lesson 04, now behind FastAPI (async routes: image
     decoding runs in a worker thread; a model as small as the digits one is batched
     right on the event loop, since a thread hop would cost more than the model, while
     bigger models run on the dynamic batcher's thread: /models says which);
  2. request validation with Pydantic and the automatic OpenAPI docs at /docs;
  3. concurrent requests batched together (watch the batch-size numbers);
  4. then it serves on http://localhost:8000 until you press Ctrl-C.

Run:   python 05_fastapi_deployment.py
Then:  curl -X POST http://localhost:8000/predict -F "file=@data/sample.jpg"
       open http://localhost:8000/docs
"""

import asyncio
import os
from pathlib import Path

import httpx

from torchship.demo import ensure_default_model
from torchship.serving import ServeSettings
from torchship.serving.fastapi_app import create_app
from torchship.serving.runner import run_fastapi
from torchship.tutorial import say, section

HOST = "127.0.0.1"
PORT = int(os.environ.get("TORCHSHIP_PORT", 8000))  # the module uses 8000
STORE = os.environ.get("TORCHSHIP_STORE", "models")
sample = Path("sample.jpg")  # a link to data/sample.jpg, so the module's curl works as written

section("1. The model")
manifest = ensure_default_model(STORE, "digits")
say(f"serving {manifest.ref}, test accuracy {manifest.metrics['test_accuracy']:.2%}")

settings = ServeSettings(store=STORE, models=["digits"], port=PORT, max_delay_ms=5)
app = create_app(settings, load_in_background=False)


async def tour() -> None:
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://lesson") as client,
    ):
        section("2. Validation with Pydantic, errors as JSON")
        r = await client.post("/predict", files={"file": ("sample.jpg", sample.read_bytes())})
        say(f"POST /predict file=@{sample} -> {r.status_code} {r.json()['predictions'][0]}")
        for body in (
            {"inputs": "seven"},
            {"top_k": 0, "inputs": [[[0.0] * 8] * 8]},
            {"nothing": 1},
        ):
            r = await client.post("/predict", json=body)
            say(f"  {body!s:<45.45} -> {r.status_code} {r.json()['error'][:90]}")
        schema = (await client.get("/openapi.json")).json()
        say(
            f"OpenAPI: {len(schema['paths'])} paths documented, e.g. {', '.join(list(schema['paths'])[:6])}"
        )

        section("3. 64 concurrent requests, dynamically batched")
        image = sample.read_bytes()
        results = await asyncio.gather(
            *(client.post("/predict", files={"file": ("s.jpg", image)}) for _ in range(64))
        )
        say(
            f"statuses: {sorted({r.status_code for r in results})}, all agree: "
            f"{len({r.json()['predictions'][0]['label'] for r in results}) == 1}"
        )
        info = (await client.get("/models")).json()["models"][0]
        metrics = (await client.get("/metrics")).text

        def counter(prefix: str) -> int:
            return int(
                float(next(ln for ln in metrics.splitlines() if ln.startswith(prefix)).split()[-1])
            )

        batches, items = counter("torchship_batch_size_count"), counter("torchship_batch_size_sum")
        say(
            f"max_batch_size chosen at warm-up: {info['max_batch_size']}, batches on the "
            f"{info['batches_on']}; since start: {items} items in {batches} batches "
            f"(the 64 above and the requests before them)"
        )


asyncio.run(tour())
section(f"4. Serving on http://localhost:{PORT} (docs at /docs) — press Ctrl-C to stop")
say(f'  curl -X POST http://localhost:{PORT}/predict -F "file=@{sample}"')
run_fastapi(create_app(settings, load_in_background=False), settings)  # uvicorn; Ctrl-C drains
say("stopped.")
