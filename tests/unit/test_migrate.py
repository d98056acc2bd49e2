"""`runner db upgrade`'s checksums and the schema guard, on SQLite files and copies of
the migrations directory (a migration edited after it ran; a database that another
host already upgraded, additively or not)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from runner.control import migrate
from runner.control.migrate import (
    MigrationChangedError,
    code_revision,
    schema_problem,
    upgrade,
)
from runner.errors import ConfigError

NEW_MIGRATION = '''"""a later release: {what}

Revision ID: {revision}
Revises: {down}
"""
import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None
{extra}

def upgrade() -> None:
    op.create_table("t_{revision}", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("t_{revision}")
'''


@pytest.fixture
def migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the migrations this code ships, used instead of them."""
    copy = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrate, "MIGRATIONS", copy)
    yield copy


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runner.db'}"


def add_migration(migrations: Path, revision: str, down: str, *, minimum: str | None = None
                  ) -> None:
    extra = f'min_code_revision = "{minimum}"' if minimum else ""
    (migrations / "versions" / f"{revision}_later.py").write_text(NEW_MIGRATION.format(
        revision=revision, down=down, extra=extra,
        what="contracting" if minimum else "additive"))


def recorded(database: str) -> dict[str, str]:
    with create_engine(database).connect() as connection:
        return dict(connection.execute(text(
            "SELECT revision, checksum FROM schema_migrations")).all())


def test_an_upgrade_records_a_checksum_per_migration(migrations: Path, tmp_path: Path) -> None:
    upgrade(url(tmp_path))
    files = list((migrations / "versions").glob("0*.py"))
    assert len(recorded(url(tmp_path))) == len(files)
    assert schema_problem(url(tmp_path)) is None
    upgrade(url(tmp_path))  # again: nothing to do, nothing refused


def test_an_edited_migration_is_refused_by_name(migrations: Path, tmp_path: Path) -> None:
    upgrade(url(tmp_path))
    edited = sorted((migrations / "versions").glob("0002_*.py"))[0]
    edited.write_text(edited.read_text() + "\n# edited after it ran\n")
    with pytest.raises(MigrationChangedError, match=f"migration 0002 \\({edited.name}\\)"):
        upgrade(url(tmp_path))


def test_checksums_are_kept_from_the_first_upgrade_that_finds_none(migrations: Path,
                                                                  tmp_path: Path) -> None:
    upgrade(url(tmp_path))
    with create_engine(url(tmp_path)).begin() as connection:
        connection.execute(text("DROP TABLE schema_migrations"))
    upgrade(url(tmp_path))
    assert len(recorded(url(tmp_path))) == len(list((migrations / "versions").glob("0*.py")))


def test_a_database_behind_the_code_is_refused(migrations: Path, tmp_path: Path) -> None:
    upgrade(url(tmp_path), "0005")
    problem = schema_problem(url(tmp_path))
    assert problem == (f"the database schema is at revision 0005, this code needs "
                       f"{code_revision()}: run `runner db upgrade`")
    with pytest.raises(ConfigError, match="run `runner db upgrade`"):
        migrate.require_current_schema(url(tmp_path))


def test_old_code_runs_on_an_additive_newer_schema_not_on_a_contracting_one(
        migrations: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = code_revision()
    add_migration(migrations, "0901", ours)
    upgrade(url(tmp_path))  # another host, with newer code, upgraded the database
    newer = migrations.parent / "newer"
    shutil.copytree(migrations, newer)
    shutil.rmtree(migrations)
    shutil.copytree(newer, migrations)
    (migrations / "versions" / "0901_later.py").unlink()  # back to this code's migrations
    assert schema_problem(url(tmp_path)) is None  # additive: old workers keep running

    monkeypatch.setattr(migrate, "MIGRATIONS", newer)
    add_migration(newer, "0902", "0901", minimum="0902")
    upgrade(url(tmp_path))
    monkeypatch.setattr(migrate, "MIGRATIONS", migrations)
    assert schema_problem(url(tmp_path)) == (
        f"the database schema is at revision 0902, newer than this code's {ours}, and needs "
        "code of revision 0902 or later: upgrade this host's runner")


def test_an_empty_database_is_refused(migrations: Path, tmp_path: Path) -> None:
    create_engine(url(tmp_path)).connect().close()
    assert "has no schema" in (schema_problem(url(tmp_path)) or "")
