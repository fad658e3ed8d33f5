"""The web page at `/`: plain HTML, CSS and JavaScript from `service/web/` (package data, no
build step, nothing fetched from elsewhere, so it works offline): `index.html`, a template
served at `/`, and the files of `static/`, served at `/static/{name}`.

The page itself is public; the API calls it makes send the key typed into it. Its input
bounds come from this server's settings, filled into `index.html` when it is served.
The static files are routes rather than a mount, so their requests carry a route label in
`cdt_request_seconds` instead of counting as unmatched paths.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from ..bodies import MIN_SIDE
from ..deps import SettingsDep
from ..domain_errors import NotFound

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
STATIC_FILES = {path.name: path for path in (WEB_DIR / "static").iterdir() if path.is_file()}
_TEMPLATE = Template((WEB_DIR / "index.html").read_text())

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def page(settings: SettingsDep) -> HTMLResponse:
    return HTMLResponse(_TEMPLATE.substitute(max_frames=settings.max_frames, max_side=settings.max_side,
                                             min_side=MIN_SIDE, max_steps=settings.max_steps))


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise NotFound(f"no file {name!r} here")
    return FileResponse(STATIC_FILES[name])
