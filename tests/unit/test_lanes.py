"""Turn-taking among tenants: the order a worker waits on their lanes in."""

from __future__ import annotations

from runner.control.lanes import TenantTurns


def served(turns: TenantTurns, backlog: dict[str, int], count: int) -> list[str]:
    """Who gets each of the next `count` runs, every tenant's lanes as in `backlog`."""
    order = []
    for _ in range(count):
        tenant = next(t for t in turns.order(backlog) if backlog[t] > 0)
        backlog[tenant] -= 1
        turns.served(tenant)
        order.append(tenant)
    return order


def test_tenants_take_turns_whatever_their_backlogs() -> None:
    assert served(TenantTurns(), {"a": 5000, "b": 2, "c": 1}, 7) == [
        "a", "b", "c", "a", "b", "a", "a"]


def test_a_new_tenant_is_served_within_one_turn_of_each_other_tenant() -> None:
    turns = TenantTurns()
    backlog = {"a": 100, "b": 100}
    served(turns, backlog, 3)  # a, b, a
    backlog["late"] = 1
    assert served(turns, backlog, 2) == ["b", "late"]


def test_a_weight_is_runs_per_turn() -> None:
    turns = TenantTurns({"big": 3})
    assert served(turns, {"big": 100, "small": 100}, 8) == [
        "big", "big", "big", "small", "big", "big", "big", "small"]


def test_a_tenant_whose_lanes_are_empty_passes_its_turn_on() -> None:
    turns = TenantTurns({"a": 5})
    assert served(turns, {"a": 1, "b": 3}, 4) == ["a", "b", "b", "b"]


def test_workers_share_the_turn_through_its_stored_state() -> None:
    """Two workers: what one served, the other passes by (the state goes through Redis
    as `state()`, read back with `load`)."""
    first, second, stored = TenantTurns(), TenantTurns(), ""
    backlog = {"a": 100, "b": 100}
    order = []
    for worker in (first, second, first, second):
        worker.load(stored)
        tenant = next(t for t in worker.order(backlog) if backlog[t] > 0)
        worker.served(tenant)
        stored = worker.state()
        order.append(tenant)
    assert order == ["a", "b", "a", "b"]
    fresh = TenantTurns()
    fresh.load("not a turn")  # unreadable: ignored
    assert fresh.current is None
