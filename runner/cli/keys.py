"""`runner keys create`, `list` and `revoke`: API keys, straight in the database."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from runner.cli.common import command, fail, settings
from runner.domain import Role

app = typer.Typer(help="API keys.", no_args_is_help=True)


def _keys() -> Any:
    from runner.control.keys import Keys
    from runner.control.store import Store

    return Keys(Store(settings().database_url))


@app.command("create")
@command
def keys_create(tenant: Annotated[str, typer.Option()],
                role: Annotated[Role, typer.Option()] = Role.SUBMITTER) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    key, plaintext = _keys().create(tenant=tenant, role=role)
    typer.echo(plaintext)
    typer.echo(f"key {key.id}: tenant {key.tenant}, role {key.role} "
               "(shown once; only its hash is stored)", err=True)


@app.command("list")
@command
def keys_list(tenant: Annotated[str | None, typer.Option()] = None) -> None:
    """List keys (ids, tenants, roles, use); never a secret."""
    for key in _keys().list(tenant=tenant):
        state = "revoked" if key["revoked_at"] else "active"
        used = key["last_used_at"].isoformat() if key["last_used_at"] else "never"
        typer.echo(f"{key['prefix']}...  {key['tenant']:<16} {key['role']:<9} {state:<8} "
                   f"last used {used}")


@app.command("revoke")
@command
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id, prefix or whole key")]
                ) -> None:
    """Revoke a key; it gets 401 from the next request on."""
    if not _keys().revoke(key_id):
        fail(f"no active key {key_id}")
    typer.echo(f"revoked {key_id}")


# Runs ---------------------------------------------------------------------
