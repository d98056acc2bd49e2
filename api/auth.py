"""Bearer API keys: who is calling, for which tenant, with which role.

One worker-thread hop per request does the whole of it: the key (from this process's
short-lived cache of valid keys, `runner.control.keys`, or the database), then the
failed-authentication block of the caller's address, the key's requests per second
and, for a submission, the tenant's submissions per minute, in one Redis round trip
(`RateLimiter.admit`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.deps import Services
from runner.control.ratelimit import Limit
from runner.domain import Role
from runner.errors import AuthenticationError, PermissionDeniedError

_bearer = HTTPBearer(auto_error=False, description="An API key made by `runner keys create`.")

_RANK = {Role.VIEWER: 0, Role.SUBMITTER: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    role: Role

    def allows(self, role: Role) -> bool:
        return _RANK[self.role] >= _RANK[role]

    def require(self, role: Role) -> None:
        """Raises: PermissionDeniedError when this key's role is below `role`."""
        if not self.allows(role):
            raise PermissionDeniedError(f"this key's role ({self.role}) cannot do this; "
                                        f"{role} or above is needed")


def client_address(request: Request) -> str:
    """The caller's address, as the server sees it (uvicorn takes it from
    X-Forwarded-For only when the connection comes from a trusted proxy:
    FORWARDED_ALLOW_IPS, 127.0.0.1 by default)."""
    return request.client.host if request.client else "unknown"


def authenticate(svc: Services, token: str, address: str, *, role: Role,
                 submission: bool = False) -> Principal:
    """The caller of a request presenting `token` from `address`, admitted (blocking
    I/O: call it in a worker thread).

    An address whose keys failed RUNNER_AUTH_FAILURES_PER_MINUTE times in a minute is
    refused for a minute, a valid key included, and before any database lookup:
    guessing keys costs the database nothing more. Only presented keys that were
    looked up and refused count (not a token that is not shaped like a key, which
    costs no lookup). The key's request counts whatever its role; a `submission`
    also counts against the tenant's submissions per minute when the role allows it.

    Raises:
        AuthenticationError: an unknown or revoked key.
        RateLimitedError: the address is blocked, or a limit is reached.
        PermissionDeniedError: the key's role is below `role`.
    """
    settings = svc.settings
    failures = f"auth-failures:{settings.instance}:{address}"
    blocked_what = (f"too many failed authentications from this address (over "
                    f"{settings.auth_failures_per_minute} a minute)")
    block = failures if settings.auth_failures_per_minute > 0 else None
    key = svc.keys.known(token)
    if key is None:  # not in the cache: the block first, then the database
        if block is not None:
            svc.limiter.check_block(block, what=blocked_what)
            block = None
        key = svc.keys.authenticate(token)
        if key is None:
            if svc.keys.looks_like_key(token):
                svc.limiter.strike(failures, limit=settings.auth_failures_per_minute,
                                   window_seconds=60)
            raise AuthenticationError("unknown or revoked API key")
    who = Principal(key_id=key.id, tenant=key.tenant, role=key.role)
    limits = [Limit(f"key:{key.id}", settings.key_requests_per_second, 1,
                    "requests for this API key")]
    if submission and who.allows(role):
        limits.append(svc.submission_limit(key.tenant))
    svc.limiter.admit(limits, block=block, block_what=blocked_what)
    who.require(role)
    return who


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    """Raises: AuthenticationError without a bearer token."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationError("missing API key: send Authorization: Bearer <key>")
    return credentials.credentials


async def _admitted(request: Request, credentials: HTTPAuthorizationCredentials | None,
                    role: Role, *, submission: bool = False) -> Principal:
    token = _token(credentials)
    who = await run_in_threadpool(authenticate, request.app.state.services, token,
                                  client_address(request), role=role,
                                  submission=submission)
    request.state.tenant = who.tenant
    return who


async def principal(request: Request,
                    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                    ) -> Principal:
    """The caller, from `Authorization: Bearer <key>` (any role).

    Raises:
        AuthenticationError: no key, or an unknown or revoked one.
        RateLimitedError: too many failed authentications from this address lately,
            or the key's requests per second.
    """
    return await _admitted(request, credentials, Role.VIEWER)


async def viewer(request: Request,
                 credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                 ) -> Principal:
    return await _admitted(request, credentials, Role.VIEWER)


async def submitter(request: Request,
                    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                    ) -> Principal:
    """A caller of role submitter or above (PermissionDeniedError, 403, otherwise)."""
    return await _admitted(request, credentials, Role.SUBMITTER)


async def submission(request: Request,
                     credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                     ) -> Principal:
    """`submitter`, with the tenant's submission counted in the same round trip:
    for the routes that make a run (RUNNER_TENANT_SUBMISSIONS_PER_MINUTE)."""
    return await _admitted(request, credentials, Role.SUBMITTER, submission=True)
