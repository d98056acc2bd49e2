import subprocess
import sys

import pytest

from runner.errors import ConfigError
from runner.settings import load_settings


def test_defaults_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RUNNER_DATABASE_URL", "RUNNER_REDIS_URL", "RUNNER_API_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.database_url.startswith("sqlite:///var/")
    assert settings.container_user == "65532:65532"


def test_postgres_url_uses_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_DATABASE_URL", "postgresql://u:p@127.0.0.1/db")
    assert load_settings().database_url == "postgresql+psycopg://u:p@127.0.0.1/db"


@pytest.mark.parametrize(("name", "value"), [
    ("RUNNER_API_PORT", "eighty"), ("RUNNER_DATABASE_URL", "mysql://x"),
    ("RUNNER_TMP_SIZE", "huge"), ("RUNNER_STOP_GRACE_SECONDS", "later"),
    ("RUNNER_REDIS_URL", "http://nope"),
])
def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str,
                                        value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert name in caught.value.message
    assert "\n" not in caught.value.message


def test_cli_reports_a_bad_setting_in_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "runner", "db", "upgrade"],
                            env={"RUNNER_API_PORT": "99999", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "RUNNER_API_PORT" in lines[0]


@pytest.mark.parametrize("value", ["0", "0:0", "root", "65532:abc"])
def test_container_user_must_be_numeric_and_not_root(monkeypatch: pytest.MonkeyPatch,
                                                     value: str) -> None:
    monkeypatch.setenv("RUNNER_CONTAINER_USER", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "RUNNER_CONTAINER_USER" in caught.value.message


def test_heartbeat_must_be_below_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_LEASE_SECONDS", "2")
    monkeypatch.setenv("RUNNER_HEARTBEAT_SECONDS", "5")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "RUNNER_HEARTBEAT_SECONDS" in caught.value.message


def test_instance_is_derived_from_the_database_without_its_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_DATABASE_URL", "postgresql://u:one@h/db")
    first = load_settings().instance
    monkeypatch.setenv("RUNNER_DATABASE_URL", "postgresql://u:two@h/db")
    assert load_settings().instance == first  # a rotated password is the same deployment
    monkeypatch.setenv("RUNNER_DATABASE_URL", "postgresql://u:two@h/other")
    assert load_settings().instance != first
    monkeypatch.setenv("RUNNER_INSTANCE_NAME", "blue")
    assert load_settings().instance == "blue"


def test_a_lease_too_short_to_self_fence_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_LEASE_SECONDS", "8")
    monkeypatch.setenv("RUNNER_STOP_GRACE_SECONDS", "5")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = caught.value.message
    assert message.startswith("invalid settings: ")
    for name in ("RUNNER_LEASE_SECONDS", "RUNNER_STOP_GRACE_SECONDS", "RUNNER_HEARTBEAT_SECONDS"):
        assert name in message
    monkeypatch.setenv("RUNNER_LEASE_SECONDS", "9")
    assert load_settings().lease_seconds == 9
