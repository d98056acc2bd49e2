"""Who is signed in to the dashboard, and what a form post must carry.

`signed_in` is the dependency of every page: the session from the cookie, its key
checked again (a revoked key ends the session at once, `ActiveKeys` remembering the
answer a few seconds), and the same `Principal` the `/v1` routes get, so tenant
scoping and roles are the API's own. `checked_form` reads a urlencoded form post
(no multipart parser needed: the dashboard's forms are a few short fields) and
refuses it unless it carries the session's CSRF token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request

from api.auth import Principal
from api.deps import Services, services
from api.ui.security import ForbiddenPost, SignInRequired
from api.ui.session import COOKIE, ActiveKeys, SessionStore, UiSession, csrf_ok
from runner.control.uiqueries import UiQueries
from runner.domain import Role
from runner.errors import InvalidRequestError, PayloadTooLargeError

FORM_MAX_BYTES = 256 * 1024  # a bulk replay of a thousand dead letters fits
FORM_MAX_FIELDS = 2000
FORM_TYPE = "application/x-www-form-urlencoded"


@dataclass
class UiState:
    """The dashboard's per-process objects, beside the API's `Services`."""

    sessions: SessionStore
    active: ActiveKeys
    queries: UiQueries


_state_lock = threading.Lock()


def ui_state(request: Request) -> UiState:
    """The app's `UiState`, made on first use from its `Services`."""
    state: UiState | None = getattr(request.app.state, "ui", None)
    if state is None:
        with _state_lock:
            state = getattr(request.app.state, "ui", None)
            if state is None:
                svc: Services = request.app.state.services
                state = UiState(
                    sessions=SessionStore(svc.queue.redis, instance=svc.settings.instance,
                                          ttl_seconds=svc.settings.ui_session_seconds),
                    active=ActiveKeys(svc.keys.is_active), queries=UiQueries(svc.store))
                request.app.state.ui = state
    return state


@dataclass(frozen=True)
class UiUser:
    """A signed-in browser: its principal, session id and CSRF token."""

    principal: Principal
    session_id: str
    csrf: str
    created_at: str

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @property
    def role(self) -> str:
        return self.principal.role.value

    @property
    def can_act(self) -> bool:
        """Whether the role may cancel and replay (submitter or admin)."""
        return self.principal.role in (Role.SUBMITTER, Role.ADMIN)


def user_of(session_id: str, session: UiSession) -> UiUser:
    return UiUser(principal=Principal(key_id=session.key_id, tenant=session.tenant,
                                      role=session.role),
                  session_id=session_id, csrf=session.csrf, created_at=session.created_at)


def signed_in(request: Request, state: Annotated[UiState, Depends(ui_state)]) -> UiUser:
    """The signed-in user of this request.

    Raises:
        SignInRequired: no session, an expired one, or one whose key was revoked
            (that session is deleted).
        ServiceUnavailableError: Redis or the database cannot be reached.
    """
    session_id = request.cookies.get(COOKIE)
    session = state.sessions.get(session_id)
    if session is None or session_id is None:
        raise SignInRequired
    if not state.active(session.key_id):
        state.sessions.delete(session_id)
        raise SignInRequired
    user = user_of(session_id, session)
    request.state.ui_user = user
    request.state.tenant = user.tenant
    return user


User = Annotated[UiUser, Depends(signed_in)]
Svc = Annotated[Services, Depends(services)]
State = Annotated[UiState, Depends(ui_state)]


async def read_form(request: Request) -> dict[str, list[str]]:
    """A urlencoded form body, field by field.

    Raises:
        PayloadTooLargeError: over FORM_MAX_BYTES.
        InvalidRequestError: not a urlencoded form, or not text.
    """
    if request.headers.get("content-type", "").split(";")[0].strip() != FORM_TYPE:
        raise InvalidRequestError(f"send the form as {FORM_TYPE}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX_BYTES:
            raise PayloadTooLargeError(f"form over {FORM_MAX_BYTES} bytes",
                                       cap=FORM_MAX_BYTES)
    try:
        return parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False,
                        max_num_fields=FORM_MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError("the form is not readable") from exc


def first(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


async def checked_form(request: Request, user: User) -> dict[str, list[str]]:
    """The form of a state-changing post, once its CSRF token is this session's.

    Raises:
        ForbiddenPost: no token, or another one (answered 403; nothing changes).
    """
    try:
        form = await read_form(request)
    except InvalidRequestError as exc:
        raise ForbiddenPost from exc
    if not csrf_ok(user.csrf, first(form, "csrf")):
        raise ForbiddenPost
    return form


Form = Annotated[dict[str, list[str]], Depends(checked_form)]


def require_actor(user: UiUser) -> None:
    """Raises: PermissionDeniedError for a viewer (cancel and replay need submitter)."""
    user.principal.require(Role.SUBMITTER)
