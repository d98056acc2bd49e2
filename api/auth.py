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


def principal(request: Request,
              credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
              svc: Services = Depends(services)) -> Principal:
    """The caller, from `Authorization: Bearer <key>`.

    Raises:
        AuthenticationError: no key, or an unknown or revoked one.
    """
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationError("missing API key: send Authorization: Bearer <key>")
    key = svc.keys.authenticate(credentials.credentials)
    if key is None:
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
