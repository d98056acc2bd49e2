"""`POST /v1/runs/batch`: up to RUNNER_BATCH_MAX_ITEMS runs in one request."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import StrictJsonRoute

router = APIRouter(prefix="/v1", route_class=StrictJsonRoute)
