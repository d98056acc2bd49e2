"""Routing by capability: which queue a tagged processor's runs go to, and which
queues a host with tags serves (pure; no Redis)."""

from __future__ import annotations

import pytest

from runner.control.queue import can_serve, host_queues, queue_tags, tagged_queue, unserved


def test_a_tag_set_names_one_queue_whatever_its_order() -> None:
    assert tagged_queue("runner", []) == "runner"
    assert tagged_queue("runner", ["large-memory", "gpu"]) == "runner@gpu+large-memory"
    assert tagged_queue("runner", ["gpu", "gpu"]) == "runner@gpu"
    assert queue_tags("runner@gpu+large-memory") == ("runner", frozenset({"gpu",
                                                                          "large-memory"}))
    assert queue_tags("runner") == ("runner", frozenset())


def test_a_host_serves_every_subset_of_its_tags_most_demanding_first() -> None:
    assert host_queues(["runner"], []) == ["runner"]
    assert host_queues(["q"], ["gpu", "big"]) == ["q@big+gpu", "q@big", "q@gpu", "q"]
    assert len(host_queues(["a", "b"], ["t1", "t2", "t3"])) == 16
    with pytest.raises(ValueError, match="at most 6"):
        host_queues(["q"], [f"t{i}" for i in range(7)])


@pytest.mark.parametrize(("host", "queue", "served"), [
    ((), "q", True), ((), "q@gpu", False), (("gpu",), "q@gpu", True),
    (("gpu",), "q@big+gpu", False), (("big", "gpu", "ssd"), "q@big+gpu", True)])
def test_a_run_reaches_only_hosts_with_every_tag(host: tuple[str, ...], queue: str,
                                                 served: bool) -> None:
    assert can_serve(host, queue) is served
    assert (queue in host_queues(["q"], host)) is served


def test_runs_on_a_queue_nobody_serves_are_unserved() -> None:
    queued = {"q": 3, "q@gpu": 2, "q@big": 0}
    assert unserved(queued, {"q", "q@big"}) == {"q@gpu": 2}
    assert unserved(queued, set()) == {"q": 3, "q@gpu": 2}
