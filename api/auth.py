"""Bearer API keys: who is calling, for which tenant, with which role."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import Services, services
from runner.domain import Role
from runner.errors import AuthenticationError, PermissionDeniedError

_bearer = HTTPBearer(auto_error=False, description="An API key made by `runner keys create`.")

_RANK = {Role.VIEWER: 0, Role.SUBMITTER: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    role: Role

    def require(self, role: Role) -> None:
        """Raises: PermissionDeniedError when this key's role is below `role`."""
        if _RANK[self.role] < _RANK[role]:
            raise PermissionDeniedError(f"this key's role ({self.role}) cannot do this; "
                                        f"{role} or above is needed")


def client_address(request: Request) -> str:
    """The caller's address, as the server sees it (uvicorn takes it from
    X-Forwarded-For only when the connection comes from a trusted proxy:
    FORWARDED_ALLOW_IPS, 127.0.0.1 by default)."""
    return request.client.host if request.client else "unknown"


def principal(request: Request,
              credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
              svc: Services = Depends(services)) -> Principal:
    """The caller, from `Authorization: Bearer <key>`.

    An address whose keys failed RUNNER_AUTH_FAILURES_PER_MINUTE times in a minute is
    refused for a minute, before any lookup: guessing keys costs the database nothing
    more. Only presented keys that were looked up and refused count (not a missing
    header, nor a token that is not shaped like a key, which cost no lookup).

    Raises:
        AuthenticationError: no key, or an unknown or revoked one.
        RateLimitedError: too many failed authentications from this address lately.
    """
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationError("missing API key: send Authorization: Bearer <key>")
    failures = f"auth-failures:{svc.settings.instance}:{client_address(request)}"
    limit = svc.settings.auth_failures_per_minute
    if limit > 0:
        svc.limiter.check_block(failures, what=f"too many failed authentications from "
                                                f"this address (over {limit} a minute)")
    key = svc.keys.authenticate(credentials.credentials)
    if key is None:
        if svc.keys.looks_like_key(credentials.credentials):
            svc.limiter.strike(failures, limit=limit, window_seconds=60)
        raise AuthenticationError("unknown or revoked API key")
    svc.limiter.hit(f"key:{key.id}", limit=svc.settings.key_requests_per_second,
                    window_seconds=1, what="requests for this API key")
    request.state.tenant = key.tenant
    return Principal(key_id=key.id, tenant=key.tenant, role=key.role)


def viewer(who: Principal = Depends(principal)) -> Principal:
    return who


def submitter(who: Principal = Depends(principal)) -> Principal:
    who.require(Role.SUBMITTER)
    return who
