"""The dashboard's one router (every `/ui/` page and post) and its static files.

`api.app` includes `router` and mounts `static_files()` at `/ui/static` (mounted
first: a route may never shadow the files). None of it is in the OpenAPI document:
the dashboard is a browser's, not a client's, interface.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.ui import actions, home, login, ops, run, runs
from api.ui.security import static_files

router = APIRouter(include_in_schema=False)
for part in (login, home, runs, run, actions, ops):
    router.include_router(part.router)

__all__ = ["router", "static_files"]
