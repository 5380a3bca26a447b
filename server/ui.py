"""The deliberation viewer: a page the server serves itself at `/ui/` (server/static/: plain HTML, CSS and
JavaScript, no build step, nothing fetched from elsewhere). It talks to the server's own API only:
`POST /v1/generate` (streamed) and `GET /v1/status`, sending the API key typed into the page as
`Authorization: Bearer`; the server keeps no key of the page's. `--no-ui` leaves it out.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
PATH = "/ui"


def mount(app: FastAPI) -> None:
    """`/ui/` serves the page and its files; `/` sends a browser there."""
    app.mount(PATH, StaticFiles(directory=STATIC, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(PATH + "/")
