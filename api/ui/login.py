"""Signing in to the dashboard with an API key, and signing out.

The key is posted once, checked by `Keys.authenticate` exactly as a bearer key is,
and never kept: the session stores the key's id, tenant and role. Failed sign-ins
count toward the same per-address limit as failed bearer keys
(RUNNER_AUTH_FAILURES_PER_MINUTE, `api.auth`): the form is no cheaper a way to
guess keys than the API.
"""

from __future__ import annotations

import re

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from api.auth import client_address
from api.deps import Services
from api.ui.access import Form, State, Svc, UiState, User, first, read_form
from api.ui.security import ForbiddenPost, UiRoute, templates
from api.ui.session import (
    COOKIE,
    COOKIE_PATH,
    LOGIN_COOKIE,
    LOGIN_COOKIE_SECONDS,
    cookie_options,
    csrf_ok,
    new_token,
    safe_next,
)
from runner.errors import InvalidRequestError, RateLimitedError

log = structlog.get_logger(__name__)

router = APIRouter(route_class=UiRoute)

TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")


def _https(request: Request) -> bool:
    return request.url.scheme == "https"


def _login_page(request: Request, *, next_path: str, message: str | None = None,
                status: int = 200) -> Response:
    """The sign-in form, its double-submit token in the form and in a cookie (the one
    the browser has already, so two sign-in tabs both work)."""
    token = request.cookies.get(LOGIN_COOKIE, "")
    if not TOKEN_SHAPE.fullmatch(token):
        token = new_token()
    response = templates.TemplateResponse(
        request, "login.html", {"user": None, "nav": "login", "login_csrf": token,
                                "next_path": next_path, "message": message},
        status_code=status)
    response.set_cookie(LOGIN_COOKIE, token, **cookie_options(
        https=_https(request), max_age=LOGIN_COOKIE_SECONDS))
    return response


@router.get("/ui/login")
def login_form(request: Request, state: State, next: str | None = None) -> Response:
    """The sign-in page; a browser already signed in goes straight on."""
    session_id = request.cookies.get(COOKIE)
    if state.sessions.get(session_id) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, next_path=safe_next(next))


@router.post("/ui/login")
async def login(request: Request, svc: Svc, state: State) -> Response:
    """Check the key; on success a new session (a fresh id, never the old one)."""
    try:
        form = await read_form(request)
    except InvalidRequestError as exc:
        raise ForbiddenPost from exc
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE, ""), first(form, "csrf")):
        raise ForbiddenPost
    return await run_in_threadpool(_sign_in, request, svc, state,
                                   presented=(first(form, "key") or "").strip(),
                                   next_path=safe_next(first(form, "next")))


def _sign_in(request: Request, svc: Services, state: UiState, *, presented: str,
             next_path: str) -> Response:
    """The key's check and the new session (database and Redis: off the event loop)."""
    failures = f"auth-failures:{svc.settings.instance}:{client_address(request)}"
    limit = svc.settings.auth_failures_per_minute
    try:
        if limit > 0:
            svc.limiter.check_block(failures, what=f"too many failed sign-ins from this "
                                                   f"address (over {limit} a minute)")
    except RateLimitedError as exc:
        return _login_page(request, next_path=next_path, message=exc.message, status=429)
    key = svc.keys.authenticate(presented) if presented else None
    if key is None:
        if svc.keys.looks_like_key(presented):
            svc.limiter.strike(failures, limit=limit, window_seconds=60)
        log.info("ui_sign_in_refused", address=client_address(request))
        return _login_page(request, next_path=next_path, status=401,
                           message="Unknown or revoked API key.")
    state.sessions.delete(request.cookies.get(COOKIE))
    session_id, _session = state.sessions.create(key_id=key.id, tenant=key.tenant,
                                                 role=key.role)
    log.info("ui_signed_in", key_id=key.id, tenant=key.tenant, role=key.role.value)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(COOKIE, session_id, **cookie_options(
        https=_https(request), max_age=state.sessions.ttl))
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH, httponly=True,
                           samesite="strict", secure=_https(request))
    return response


@router.post("/ui/logout")
def logout(request: Request, user: User, _form: Form, state: State) -> Response:
    """End the session (its Redis record is deleted) and forget the cookie."""
    state.sessions.delete(user.session_id)
    log.info("ui_signed_out", key_id=user.principal.key_id)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict",
                           secure=_https(request))
    return response

