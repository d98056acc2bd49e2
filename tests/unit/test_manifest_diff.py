"""`runner.manifest.diff`: added, removed, re-pinned and re-configured processor versions."""

import textwrap

from runner.manifest import parse_manifest
from runner.manifest.diff import EXIT_DIFFERENT, EXIT_SAME, diff_manifests

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
REPO = "127.0.0.1:5000/processors"

OLD = textwrap.dedent(f"""\
    version: 1
    defaults:
      limits: {{memory: 256Mi, timeout: 300s}}
    processors:
      - name: echo
        version: "1.0.0"
        image: {REPO}/echo@{A}
        limits: {{cpus: 0.5, memory: 64Mi}}
      - name: sleep
        version: "1.0.0"
        image: {REPO}/sleep@{A}
      - name: exit
        version: "1.0.0"
        image: {REPO}/exit@{A}
        retry: {{max_attempts: 3, on: ["exit:75"]}}
    """)


def diff(old: str, new: str):  # type: ignore[no-untyped-def]
    return diff_manifests(parse_manifest(old, source="old.yaml"),
                          parse_manifest(new, source="new.yaml"))


def test_identical_manifests_are_equal() -> None:
    result = diff(OLD, OLD)
    assert result.equal and result.exit_code == EXIT_SAME
    assert list(result.lines()) == []
    assert result.summary() == "no differences"
    assert result.as_json()["equal"] is True


def test_reordering_comments_and_spelling_of_values_are_not_differences() -> None:
    reordered = textwrap.dedent(f"""\
        # the same allowlist, written differently
        version: 1
        defaults:
          limits: {{memory: 268435456, timeout: 5m}}
        processors:
          - name: exit
            version: "1.0.0"
            retry: {{on: ["exit:75"], max_attempts: 3}}
            image: {REPO}/exit@{A}
          - name: sleep
            version: "1.0.0"
            image: {REPO}/sleep@{A}
          - name: echo
            version: "1.0.0"
            image: {REPO}/echo@{A}
            limits: {{memory: 64Mi, cpus: 0.5}}
        """)
    result = diff(OLD, reordered)
    assert result.equal, list(result.lines())
    # The file changed, so the revisions differ even though the allowlist does not.
    assert result.old_revision != result.new_revision


def test_added_and_removed_versions() -> None:
    new = OLD.replace('name: sleep\n    version: "1.0.0"', 'name: sleep\n    version: "2.0.0"')
    result = diff(OLD, new)
    assert [(p.name, p.version) for p in result.added] == [("sleep", "2.0.0")]
    assert [(p.name, p.version) for p in result.removed] == [("sleep", "1.0.0")]
    assert result.changed == ()
    assert result.exit_code == EXIT_DIFFERENT
    assert list(result.lines()) == [f"+ sleep 2.0.0: {REPO}/sleep@{A}",
                                    f"- sleep 1.0.0: {REPO}/sleep@{A}"]
    assert result.summary() == ("1 added, 1 removed, 0 re-pinned, "
                                "0 with changed settings only")


def test_repinned_digest_shows_old_and_new() -> None:
    result = diff(OLD, OLD.replace(f"echo@{A}", f"echo@{B}"))
    (change,) = result.changed
    assert change.repinned and change.settings == ()
    assert list(result.lines()) == [f"~ echo 1.0.0: re-pinned {A} -> {B}"]
    body = result.as_json()["changed"][0]
    assert body["old_digest"] == A and body["new_digest"] == B and body["repinned"] is True


def test_moved_repository_shows_whole_references() -> None:
    result = diff(OLD, OLD.replace(f"{REPO}/echo@{A}", f"10.0.0.1:5000/echo@{A}"))
    assert list(result.lines()) == [
        f"~ echo 1.0.0: re-pinned {REPO}/echo@{A} -> 10.0.0.1:5000/echo@{A}"]


def test_changed_limits_and_retry_without_repin() -> None:
    new = (OLD.replace("limits: {cpus: 0.5, memory: 64Mi}", "limits: {cpus: 0.5, memory: 128Mi}")
              .replace('retry: {max_attempts: 3, on: ["exit:75"]}',
                       'retry: {max_attempts: 5, on: ["exit:75", timeout],'
                       ' backoff: {initial: 500ms}}'))
    result = diff(OLD, new)
    assert [c.repinned for c in result.changed] == [False, False]
    assert list(result.lines()) == [
        "~ echo 1.0.0: settings changed",
        "    limits.memory: 64Mi -> 128Mi",
        "~ exit 1.0.0: settings changed",
        "    retry.max_attempts: 3 -> 5",
        "    retry.backoff.initial: 1s -> 500ms",
        "    retry.on: [exit:75] -> [exit:75, timeout]",
    ]


def test_a_changed_default_shows_on_every_entry_it_affects() -> None:
    result = diff(OLD, OLD.replace("timeout: 300s", "timeout: 60s"))
    assert [(c.new.name, [s.setting for s in c.settings]) for c in result.changed] == [
        ("echo", ["limits.timeout"]), ("exit", ["limits.timeout"]),
        ("sleep", ["limits.timeout"])]
    assert all(s.old == "300s" and s.new == "60s"
               for c in result.changed for s in c.settings)


def test_repin_with_setting_changes_lists_both() -> None:
    new = OLD.replace(f"sleep@{A}", f"sleep@{B}\n    max_concurrency: 2\n    queue: slow")
    result = diff(OLD, new)
    assert list(result.lines()) == [
        f"~ sleep 1.0.0: re-pinned {A} -> {B}",
        "    queue: (default) -> slow",
        "    max_concurrency: (unlimited) -> 2",
    ]
    assert result.as_json()["changed"][0]["settings"] == [
        {"setting": "queue", "old": "(default)", "new": "slow"},
        {"setting": "max_concurrency", "old": "(unlimited)", "new": "2"}]


def test_input_schema_and_description_changes_count() -> None:
    new = OLD.replace(f"sleep@{A}", f"sleep@{A}\n    description: naps\n"
                      "    input_schema: {type: object, required: [seconds]}")
    result = diff(OLD, new)
    assert list(result.lines()) == [
        "~ sleep 1.0.0: settings changed",
        '    input_schema: {"type":"object"} -> {"required":["seconds"],"type":"object"}',
        '    description: "" -> "naps"',
    ]


def test_json_report_shape() -> None:
    new = OLD.replace(f"echo@{A}", f"echo@{B}") + textwrap.indent(textwrap.dedent(f"""\
        - name: extra
          version: "0.1"
          image: {REPO}/extra@{B}
        """), "  ")
    body = diff(OLD, new).as_json()
    assert set(body) == {"equal", "old_revision", "new_revision", "added", "removed",
                         "changed"}
    assert body["equal"] is False
    assert body["added"] == [{"name": "extra", "version": "0.1",
                              "image": f"{REPO}/extra@{B}", "digest": B}]
    assert body["removed"] == []
    assert body["changed"][0]["name"] == "echo"
