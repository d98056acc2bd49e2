"""`runner db upgrade` and the schema guard: the migrations in `migrations/`, a checksum
of each one as it was applied, and whether this code may run on the database's schema.

**Checksums.** `upgrade` applies one revision at a time and records, in the
`schema_migrations` table (the upgrade's own bookkeeping, made by it like Alembic's
`alembic_version`), each revision's SHA-256 of its file and the oldest code revision
that still runs on it. Before applying anything it checks every recorded checksum
against the file: a migration edited after it ran is refused, naming it, because the
database no longer is what that file says. Revisions applied before this table
existed are recorded at the first upgrade that finds them (trust on first use).

**The guard** (`schema_problem`, called at the start of the API and of each worker,
and by `/readyz`). Migrations are additive: each expands the schema so that the code
of the revision before it still runs (columns and tables are added, never renamed
or dropped in the same release; a later, contracting release says so by setting
`min_code_revision` in its file). So:
- a database behind this code's revision: refused, "run `runner db upgrade`";
- the same revision: fine;
- a database ahead (another host already upgraded it): fine while this code's
  revision is at least the newest `min_code_revision` recorded, so old and new
  workers run side by side during a rolling upgrade; refused otherwise, naming both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    inspect,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from runner.errors import ConfigError, ServiceUnavailableError

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"

LEDGER = Table(
    "schema_migrations", MetaData(),
    Column("revision", String(32), primary_key=True),
    Column("checksum", String(64), nullable=False),
    Column("min_code_revision", String(32), nullable=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)


class MigrationChangedError(ConfigError):
    """An applied migration's file is not what was applied."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def code_revision() -> str:
    """The schema revision this code is written for (the newest migration it ships)."""
    head = scripts().get_current_head()
    assert head is not None, "no migrations"
    return head


def checksum(script: Script) -> str:
    return hashlib.sha256(Path(script.path).read_bytes()).hexdigest()


def min_code_revision(script: Script) -> str | None:
    """The oldest code revision that runs on the schema `script` makes, when it
    contracts the schema (its file sets `min_code_revision`); None for an additive
    one, on which every older code that ran before it still runs."""
    declared = getattr(script.module, "min_code_revision", None)
    return str(declared) if declared is not None else None


def _lineage() -> list[Script]:
    """This code's revisions, oldest first."""
    return list(reversed(list(scripts().walk_revisions())))


def database_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    return revision


def _recorded(engine: Engine) -> dict[str, tuple[str, str | None]]:
    if not inspect(engine).has_table(LEDGER.name):
        return {}
    with engine.connect() as connection:
        return {row.revision: (row.checksum, row.min_code_revision)
                for row in connection.execute(select(LEDGER))}


def _record(engine: Engine, script: Script) -> None:
    with engine.begin() as connection:
        LEDGER.create(connection, checkfirst=True)
        connection.execute(LEDGER.delete().where(LEDGER.c.revision == script.revision))
        connection.execute(LEDGER.insert().values(
            revision=script.revision, checksum=checksum(script),
            min_code_revision=min_code_revision(script), applied_at=datetime.now(UTC)))


def verify_checksums(engine: Engine) -> None:
    """Raises: MigrationChangedError for an applied migration whose file changed."""
    recorded = _recorded(engine)
    for script in _lineage():
        found = recorded.get(script.revision)
        if found is not None and found[0] != checksum(script):
            raise MigrationChangedError(
                f"migration {script.revision} ({Path(script.path).name}) has changed since "
                f"it was applied (checksum {found[0][:12]}, the file now {checksum(script)[:12]}"
                "): the schema is not what the file says; restore the file as it was "
                "applied and put the change in a new migration")


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database schema up to `revision`, one migration at a time, recording
    each one's checksum; a no-op when it is current.

    Raises:
        MigrationChangedError: an applied migration's file was edited since.
    """
    if database_url.startswith("sqlite:///"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    config = alembic_config(database_url)
    engine = create_engine(database_url)
    try:
        verify_checksums(engine)
        lineage = _lineage()
        target = code_revision() if revision == "head" else revision
        current = database_revision(engine)
        order = [s.revision for s in lineage]
        applied = order[:order.index(current) + 1] if current in order else []
        recorded = _recorded(engine)
        for script in lineage:
            if script.revision in applied and script.revision not in recorded:
                _record(engine, script)  # applied before checksums were kept
        for script in lineage[len(applied):order.index(target) + 1]:
            command.upgrade(config, script.revision)
            _record(engine, script)
    finally:
        engine.dispose()


@dataclass(frozen=True)
class SchemaState:
    database: str | None
    code: str
    problem: str | None


def schema_state(engine: Engine) -> SchemaState:
    """Whether this code may run on the schema the database holds (see the module)."""
    code = code_revision()
    database = database_revision(engine)
    order = [s.revision for s in _lineage()]
    if database == code:
        return SchemaState(database, code, None)
    if database is None:
        return SchemaState(database, code, f"the database has no schema; this code needs "
                                           f"revision {code}: run `runner db upgrade`")
    if database in order:
        return SchemaState(database, code, f"the database schema is at revision {database}, "
                                           f"this code needs {code}: run `runner db upgrade`")
    needed = [minimum for _, minimum in _recorded(engine).values() if minimum]
    unknown = [m for m in needed if m not in order]
    behind = [m for m in needed if m in order and order.index(m) > order.index(code)]
    if unknown or behind:
        wanted = max(behind, key=order.index) if behind else unknown[0]
        return SchemaState(database, code, (
            f"the database schema is at revision {database}, newer than this code's {code}, "
            f"and needs code of revision {wanted} or later: upgrade this host's runner"))
    return SchemaState(database, code, None)  # a newer, additive schema: old code runs


def schema_problem(database_url: str) -> str | None:
    """`schema_state(...).problem` for a URL.

    Raises:
        ServiceUnavailableError: the database does not answer.
    """
    engine = create_engine(database_url)
    try:
        return schema_state(engine).problem
    except SQLAlchemyError as exc:
        raise ServiceUnavailableError(f"database unavailable: {exc}") from exc
    finally:
        engine.dispose()


def require_current_schema(database_url: str) -> None:
    """Refuse to start on a schema this code cannot run on.

    Raises:
        ConfigError: one line naming both revisions and what to do.
        ServiceUnavailableError: the database does not answer.
    """
    problem = schema_problem(database_url)
    if problem is not None:
        raise ConfigError(problem)


def check_schema(engine: Engine) -> None:
    """`require_current_schema` on an engine the caller already has (`/readyz`).

    Raises:
        ConfigError: this code cannot run on the database's schema.
        ServiceUnavailableError: the database does not answer.
    """
    try:
        problem = schema_state(engine).problem
    except SQLAlchemyError as exc:
        raise ServiceUnavailableError(f"database unavailable: {exc}") from exc
    if problem is not None:
        raise ConfigError(problem)
