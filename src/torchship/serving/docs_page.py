"""API docs both front ends serve: Swagger UI at ``/docs``, ReDoc at ``/redoc``.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on a machine without
internet (an air-gapped cluster, this project's CI) they render blank. These pages load
the same libraries from copies installed with the package (``fastapi-offline`` ships
swagger-ui-dist 5 and redoc 2, the versions FastAPI's pages name) and served under
``/static/``. With auth on, the page shells and assets need no key (they hold no data);
the spec and every "Try it out" call carry the key the page asks for once
(``static/apikey.js``).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

OPENAPI_PATH = "/openapi.json"
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
PAGES = (DOCS_PATH, REDOC_PATH)

# name under /static/ -> content type; read from fastapi_offline/static
VENDOR_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>torchship API - {title}</title>
  <link rel="icon" href="/static/favicon.png">
{head}</head>
<body style="margin: 0">
  <div id="docs" data-kind="{kind}" data-spec="{spec}"></div>
  <script src="/static/apikey.js"></script>
  <script src="/static/{library}"></script>
  <script src="/static/docs.js"></script>
</body>
</html>
"""


@cache
def page(path: str) -> bytes:
    """The HTML of ``/docs`` (Swagger UI) or ``/redoc``."""
    if path == REDOC_PATH:
        return _PAGE.format(
            title="ReDoc", head="", kind="redoc", spec=OPENAPI_PATH, library="redoc.standalone.js"
        ).encode()
    return _PAGE.format(
        title="Swagger UI",
        head='  <link rel="stylesheet" href="/static/swagger-ui.css">\n',
        kind="swagger",
        spec=OPENAPI_PATH,
        library="swagger-ui-bundle.js",
    ).encode()


# ReDoc's sidebar credit shows a logo from Redocly's CDN: served without it, the page
# makes no request to another host.
_REDOC_LOGO = b'src:"https://cdn.redoc.ly/redoc/logo-mini.svg"'


@cache
def vendor_asset(name: str) -> tuple[bytes, str] | None:
    """(content, content type) of a Swagger UI / ReDoc file, or None for other names."""
    kind = VENDOR_ASSETS.get(name)
    if kind is None:
        return None
    content = (resources.files("fastapi_offline") / "static" / name).read_bytes()
    if name == "redoc.standalone.js":
        content = content.replace(_REDOC_LOGO, b'src:"/static/favicon.png"')
    return content, kind


def openapi_for(service: Any) -> dict[str, Any]:
    """The OpenAPI document of the API both front ends serve (one route table), built
    from the FastAPI app's declarations over ``service`` without starting it."""
    from torchship.serving.fastapi_app import create_app

    return create_app(service=service, load_in_background=False).openapi()
