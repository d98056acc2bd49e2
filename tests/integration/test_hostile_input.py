"""Hostile JSON in a submission over real HTTP: a `422` naming `input`, nothing stored.

Python's json module reads `NaN`, `Infinity` and `-Infinity`, turns `1e999` into an
infinite float and refuses an integer of over 4,300 digits with a ValueError; none of
these is JSON every reader agrees on, so the API refuses them all before anything is
recorded (docs/errors.md, "invalid_request").
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest

from runner.control.keys import Keys
from runner.control.store import Store
from runner.domain import Role

TENANT = f"hostile-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def hostile_key(store: Store) -> Iterator[str]:
    """A submitter of a tenant of its own, so "nothing stored" is exact."""
    yield Keys(store).create(tenant=TENANT, role=Role.SUBMITTER)[1]


def post_raw(api_url: str, key: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{api_url}/v1/runs", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}",
                               "Content-Type": "application/json"})


HUGE = "9" * 5000


def stored_runs(store: Store) -> list[str]:
    return [run.id for run in store.list_runs(tenant=TENANT, limit=200)[0]]


@pytest.mark.parametrize("value", [
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", HUGE, "-" + HUGE,
    str(2**63), str(-(2**63) - 1), str(10**40), "[1, NaN]", '{"deep": [{"x": Infinity}]}',
])
def test_non_finite_and_huge_numbers_in_input_are_422_naming_input(
        api_url: str, hostile_key: str, store: Store, value: str) -> None:
    before = stored_runs(store)
    body = b'{"processor": "echo", "input": {"message": "hi", "n": ' + value.encode() + b"}}"
    response = post_raw(api_url, hostile_key, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == "input"
    assert error["message"].startswith("input.n")
    assert "Traceback" not in error["message"]
    assert stored_runs(store) == before


def test_the_edges_of_the_integer_range_are_accepted(
        api_url: str, hostile_key: str, store: Store) -> None:
    body = (b'{"processor": "echo", "input": {"message": "hi", "low": '
            + str(-(2**63)).encode() + b', "high": ' + str(2**63 - 1).encode()
            + b', "big": 1.5e300}}')
    response = post_raw(api_url, hostile_key, body)
    assert response.status_code == 202, response.text
    assert response.json()["input"] == {"message": "hi", "low": -(2**63),
                                        "high": 2**63 - 1, "big": 1.5e300}
    stored = store.get_run(response.json()["id"], tenant=TENANT)
    assert stored is not None and stored.input["high"] == 2**63 - 1


def test_a_huge_number_outside_input_names_its_own_field(
        api_url: str, hostile_key: str, store: Store) -> None:
    before = stored_runs(store)
    body = b'{"processor": "echo", "input": {}, "timeout_seconds": ' + HUGE.encode() + b"}"
    response = post_raw(api_url, hostile_key, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "timeout_seconds"
    nan = post_raw(api_url, hostile_key, b'{"processor": "echo", "input": {}, '
                                         b'"timeout_seconds": NaN}')
    assert nan.status_code == 422, nan.text
    assert nan.json()["error"]["field"] == "timeout_seconds"
    assert stored_runs(store) == before
