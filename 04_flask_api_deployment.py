"""Lesson 04 — A REST API for image classification with Flask.

What you will see:
  1. the default digits model, trained and stored on first run (./models);
  2. a Flask app that is a thin adapter over torchship's InferenceService:
     request parsing -> image preprocessing -> dynamic batching -> top-k answer;
  3. validation and error handling: every bad request gets a clear JSON 4xx;
  4. then it serves on http://localhost:5000 until you press Ctrl-C.

Run:   python 04_flask_api_deployment.py
Then:  curl -X POST http://localhost:5000/predict -F "image=@data/sample.jpg"
(The lesson uses Flask's development server; in production torchship runs the same app
under gunicorn: torchship serve --framework flask --workers auto.)
"""

import io
import os
from pathlib import Path

from torchship.demo import ensure_default_model
from torchship.serving import ServeSettings
from torchship.serving.flask_app import create_app
from torchship.tutorial import say, section

HOST = "127.0.0.1"
PORT = int(os.environ.get("TORCHSHIP_PORT", 5000))  # the module uses 5000
STORE = os.environ.get("TORCHSHIP_STORE", "models")
sample = Path("sample.jpg")  # a link to data/sample.jpg, so the module's curl works as written

section("1. The model")
manifest = ensure_default_model(STORE, "digits")
say(
    f"serving {manifest.ref}: {manifest.description} test accuracy "
    f"{manifest.metrics['test_accuracy']:.2%}"
)

section("2. The app: routes translate HTTP to InferenceService calls")
settings = ServeSettings(store=STORE, models=["digits"], port=PORT, max_body_bytes=2 * 1024 * 1024)
app = create_app(settings, load_in_background=False)
client = app.test_client()
resp = client.post("/predict", data={"image": (io.BytesIO(sample.read_bytes()), "sample.jpg")})
say(
    f"POST /predict image=@{sample} -> {resp.status_code} {resp.get_json()['predictions'][0]['label']!r}"
)
say(f"  {resp.get_json()}")

section("3. Bad requests get clear 4xx JSON errors, and the server keeps serving")
cases = {
    "not an image": dict(data={"image": (io.BytesIO(b"hello"), "x.jpg")}),
    "truncated JPEG": dict(data={"image": (io.BytesIO(sample.read_bytes()[:300]), "x.jpg")}),
    "form without a file": dict(data={"name": "x"}),
    "wrong tensor shape": dict(json={"inputs": [[1.0, 2.0]]}),
    "NaN in tensor": dict(json={"inputs": [[[float("nan")] * 8] * 8]}),
    "wrong content type": dict(data=b"a,b", content_type="text/csv"),
    "3 MB body": dict(data=b"x" * 3_000_000, content_type="image/png"),
}
for name, kwargs in cases.items():
    r = client.post("/predict", **kwargs)
    say(f"  {name:<20} -> {r.status_code} {r.get_json()['error']}")
r = client.post("/predict?model=cats", json={"inputs": [[[0.0] * 8] * 8]})
say(f"  {'unknown model':<20} -> {r.status_code} {r.get_json()['error']}")
say(f"  {'GET /predict':<20} -> {client.get('/predict').status_code}")
say(f"still serving: GET /health/ready -> {client.get('/health/ready').status_code}")

section(f"4. Serving on http://localhost:{PORT} — press Ctrl-C to stop")
say(f'  curl -X POST http://localhost:{PORT}/predict -F "image=@{sample}"')
say(f"  curl http://localhost:{PORT}/models      curl http://localhost:{PORT}/metrics")
try:
    app.run(host=HOST, port=PORT, threaded=True)
except KeyboardInterrupt:
    pass
finally:
    app.extensions["torchship"].stop()  # drain the batchers
    say("stopped.")
