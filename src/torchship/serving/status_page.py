"""The status page both front ends serve at ``/`` to browsers: loaded models and versions,
traffic policies, live request rate and latency, and a playground (draw a digit or upload
an image, see the prediction).

The page is static HTML/JS/CSS shipped as package data (``serving/static/``); it polls
``/status`` (:func:`status`, JSON) and posts to ``/predict``. API clients asking ``/`` for
JSON keep getting the short JSON answer (:func:`index`).
"""

from __future__ import annotations

import time
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from torchship import __version__
from torchship.serving import docs_page

if TYPE_CHECKING:
    from torchship.serving.service import InferenceService

STATUS_PATH = "/status"
STATIC_PREFIX = "/static/"
HTML = "text/html; charset=utf-8"

# name -> content type: nothing else under /static/ is served.
ASSETS = {
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
    "apikey.js": "text/javascript; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
}
# Assets change only with the package: browsers may keep them an hour.
ASSET_CACHE_CONTROL = "public, max-age=3600"


def wants_html(accept: str | None) -> bool:
    """A browser's navigation (``Accept: text/html,...``) gets the page; ``*/*`` (curl,
    requests) and ``application/json`` get JSON, as before the page existed. Quality
    values count (``text/html;q=0`` is a refusal); on a tie the first named wins."""
    if not accept:
        return False
    quality: dict[str, float] = {}
    order: list[str] = []
    for part in accept.split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        kind = kind.lower()
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if kind not in quality:
            order.append(kind)
        quality[kind] = max(q, quality.get(kind, 0.0))
    html, json = quality.get("text/html", 0.0), quality.get("application/json", -1.0)
    if html <= 0:
        return False
    if html != json:
        return html > json
    return order.index("text/html") < order.index("application/json")


@cache
def _read(name: str) -> bytes:
    return (resources.files("torchship.serving") / "static" / name).read_bytes()


def page() -> bytes:
    return _read("status.html")


def asset(name: str) -> tuple[bytes, str] | None:
    """(content, content type) of a page asset (ours or the docs' libraries), or None
    for any other name."""
    kind = ASSETS.get(name)
    return (_read(name), kind) if kind else docs_page.vendor_asset(name)


def is_page_shell(path: str, accept: str | None) -> bool:
    """A request for one of the HTML pages (status, docs) or their assets.

    These hold no data, so they stay open while auth is on: the calls the pages then
    make (``/status``, ``/openapi.json``, ``/predict``) carry the key the page asks for.
    """
    return (
        path.startswith(STATIC_PREFIX)
        or path in docs_page.PAGES
        or (path == "/" and wants_html(accept))
    )


def index(service: InferenceService) -> dict[str, Any]:
    """``/`` for API clients."""
    ready, _ = service.readiness()
    return {
        "name": "torchship",
        "version": __version__,
        "ready": ready,
        "models": service.model_names(),
        "status": STATUS_PATH,
        "docs": "/docs",
    }


def status(service: InferenceService) -> dict[str, Any]:
    """What the page shows: models, versions, traffic policies, and the counters the page
    turns into live rates (over all worker processes)."""
    ready, health = service.readiness()
    loaded = service.models()
    models = []
    for name in service.model_names():
        router = service.traffic.router(name)
        models.append(
            {
                "name": name,
                "versions": [_version(m) for m in loaded if m.name == name],
                "traffic": router.state() if router is not None else None,
            }
        )
    return {
        "name": "torchship",
        "version": __version__,
        "ready": ready,
        "draining": health.get("draining", False),
        "time": time.time(),
        "models": models,
        "load_errors": dict(service.load_errors),
        "metrics": service.metrics.summary(),
    }


def _version(m: Any) -> dict[str, Any]:
    spec = m.predictor.input_spec
    return {
        "version": m.version,
        "ready": m.ready,
        "runtime": m.predictor.runtime,
        "device": str(m.predictor.device),
        "max_batch_size": m.batcher.max_batch_size,
        "input": {"kind": spec.kind, "shape": list(spec.shape)} if spec else None,
        "labels": len(m.predictor.labels or ()),
        "load_seconds": round(m.load_seconds, 3),
        "metrics": m.predictor.manifest.metrics,
    }
