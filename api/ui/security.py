"""What every `/ui/` response carries, and how the dashboard answers errors.

`UiRoute` wraps each dashboard route: errors of the runner's tree become an HTML
error page with the status the API would give (`api.errors.status_of`), a missing
session a redirect to the sign-in page (401 for the JSON live endpoints), a POST
from another origin a 403; and every response gets the security headers below. The
static files get the same headers from `UiStatic`.

The content security policy allows no inline script or style at all (no `style=`
attributes, no `onclick=`): scripts and styles come from `/ui/static/` only, and
nothing is fetched from anywhere else. Pages are `no-store`: they hold a tenant's
data and a CSRF token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import Scope

from api.errors import status_of
from api.ui.templating import build_templates
from runner.errors import RunnerError

log = structlog.get_logger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY"}
LIVE_SUFFIX = "/live"  # the JSON endpoints the pages poll end so

templates = build_templates()


class SignInRequired(Exception):
    """No live session (none, expired, signed out, or its key was revoked)."""


class ForbiddenPost(Exception):
    """A state-changing request without this session's CSRF token, or from another
    origin: refused before anything changes."""


def secure(headers: MutableHeaders, *, cache: str = "no-store") -> None:
    """Add the dashboard's headers, keeping any a response set itself (a download's
    stricter sandbox policy)."""
    for name, value in HEADERS.items():
        headers.setdefault(name, value)
    headers.setdefault("Cache-Control", cache)


def error_page(request: Request, status: int, message: str,
               headers: dict[str, str] | None = None) -> Response:
    """The error as a page (or as JSON for a live endpoint, which a script reads)."""
    if request.url.path.endswith(LIVE_SUFFIX):
        return JSONResponse({"error": {"message": message}}, status_code=status,
                            headers=headers)
    user = getattr(request.state, "ui_user", None)
    return templates.TemplateResponse(
        request, "error.html", {"user": user, "nav": "", "status": status,
                                "message": message}, status_code=status, headers=headers)


def _same_origin(request: Request) -> bool:
    """A POST's Origin, when the browser sends one, is this server's own."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin == f"{request.url.scheme}://{request.url.netloc}"


def sign_in_redirect(request: Request) -> Response:
    if request.url.path.endswith(LIVE_SUFFIX):
        return JSONResponse({"error": {"message": "signed out"}}, status_code=401)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/ui/login" if request.method != "GET" or target == "/ui/"
                            else f"/ui/login?next={quote(target, safe='/')}", status_code=303)


class UiRoute(APIRoute):
    """A dashboard route: HTML errors, sign-in redirects, security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            started = time.monotonic()
            try:
                if request.method == "POST" and not _same_origin(request):
                    raise ForbiddenPost
                response = await handler(request)
            except SignInRequired:
                response = sign_in_redirect(request)
            except ForbiddenPost:
                log.warning("ui_post_refused", path=request.url.path)
                response = error_page(request, 403, "This form has expired or did not "
                                      "come from this dashboard: nothing was changed. "
                                      "Reload the page and try again.")
            except RunnerError as exc:
                status = status_of(exc)
                headers = None
                if "retry_after" in exc.context:
                    headers = {"Retry-After": str(exc.context["retry_after"])}
                if status == 500:
                    log.error("ui_request_failed", error=exc.message, code=exc.code)
                response = error_page(request, status, exc.message if status != 500
                                      else "internal error", headers)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
                response = error_page(request, 422, f"{where or 'request'}: "
                                                    f"{first.get('msg', 'invalid')}")
            except Exception:
                log.exception("ui_request_crashed", path=request.url.path,
                              elapsed_ms=round((time.monotonic() - started) * 1000))
                response = error_page(request, 500, "internal error")
            secure(response.headers)
            return response

        return guarded


class UiStatic(StaticFiles):
    """`/ui/static/`: the stylesheet and script, from the package, with the headers
    (revalidated by ETag on each load, so a new release is picked up at once)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            response = await super().get_response(path, scope)
        except HTTPException as exc:  # not found, or a method other than GET and HEAD
            response = PlainTextResponse(str(exc.detail), status_code=exc.status_code,
                                         headers=exc.headers)
        secure(response.headers, cache="no-cache")
        return response


def static_files() -> UiStatic:
    return UiStatic(packages=[("api.ui", "static")])
