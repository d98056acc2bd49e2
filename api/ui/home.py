"""`/ui/`: the overview of the last hour, for the signed-in tenant.

The figures are `runner.control.overview.Overviews` (one bounded read of `runs`), the
pictures `api.ui.charts` (server-side SVG, escaped there; inserted with `Markup`
because that module builds them, never from data as is). With JavaScript on, the page
reloads itself every half minute; without, it is a snapshot.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import Response
from markupsafe import Markup

from api.ui.access import Svc, User
from api.ui.charts import durations_svg, runs_per_minute_svg
from api.ui.security import UiRoute, templates
from runner.control.overview import Overviews
from runner.domain import utcnow

router = APIRouter(route_class=UiRoute)

WINDOW = timedelta(hours=1)


@router.get("/ui/")
def overview_page(request: Request, user: User, svc: Svc) -> Response:
    """Runs per minute by status, durations per processor, the queue, what fails."""
    until = utcnow()
    figures = Overviews(svc.store).overview(tenant=user.tenant, since=until - WINDOW,
                                            until=until)
    return templates.TemplateResponse(request, "overview.html", {
        "user": user, "nav": "overview", "figures": figures,
        "per_minute_svg": Markup(runs_per_minute_svg(  # noqa: S704 - built escaped
            figures.per_minute, since=figures.since, until=figures.until)),
        "durations_svg": Markup(durations_svg(figures.processors))})  # noqa: S704
