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


def add_check_page(app: FastAPI) -> None:
    """Serve the page at / and its script and style under /static/ (neither is in the OpenAPI schema)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def check_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")
