"""GET /: the LoRA check page, for judging a LoRA by eye on the GPU box that runs the service.

Plain HTML, JS and CSS shipped in this package (api/static): no build step and no external
assets, because that box may be offline. The page calls /v1/generate like any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
# The page keeps the API key in sessionStorage: no script but its own may run, and it talks to this
# service only. Images may come from anywhere (a reference given by URL) or be data: URIs (results).
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data: blob: https: http:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def add_check_page(app: FastAPI) -> None:
    """Serve the page at / and its script and style under /static/ (neither is in the OpenAPI schema)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def check_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)
