"""What changed between two manifests: added, removed and re-pinned processor versions.

Pure: compares two parsed `Manifest` objects and returns data; reading the files and
printing belong to the CLI. The comparison is of the *effective* allowlist (each entry
after the manifest's defaults are applied), so re-ordering, comments or moving a limit
into `defaults` are not differences, while a changed default shows up on every entry
it affects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from runner.manifest import Manifest, Processor

# Exit codes of `runner manifest diff`, the diff(1) convention CI tools expect.
EXIT_SAME = 0
EXIT_DIFFERENT = 1
EXIT_INVALID = 2


def size_text(value: int) -> str:
    """Bytes as the manifest writes them: `64Mi`, `1Gi`, or a plain number."""
    for unit, factor in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def seconds_text(value: float) -> str:
    """Seconds as the manifest writes them: `30s`, `500ms`."""
    if value and value < 1:
        return f"{value * 1000:g}ms"
    return f"{value:g}s"


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# Each compared setting: its name as written in the manifest, how to read it from a
# processor, and how to show it.
_SETTINGS: tuple[tuple[str, Callable[[Processor], Any], Callable[[Any], str]], ...] = (
    ("limits.cpus", lambda p: p.limits.cpus, lambda v: f"{v:g}"),
    ("limits.memory", lambda p: p.limits.memory_bytes, size_text),
    ("limits.pids", lambda p: p.limits.pids, str),
    ("limits.timeout", lambda p: p.limits.timeout_seconds, seconds_text),
    ("limits.log_bytes", lambda p: p.limits.log_bytes, size_text),
    ("limits.output_bytes", lambda p: p.limits.output_bytes, size_text),
    ("retry.max_attempts", lambda p: p.retry.max_attempts, str),
    ("retry.backoff.initial", lambda p: p.retry.backoff_initial_seconds, seconds_text),
    ("retry.backoff.max", lambda p: p.retry.backoff_max_seconds, seconds_text),
    ("retry.on", lambda p: sorted(p.retry.on), lambda v: "[" + ", ".join(v) + "]"),
    ("queue", lambda p: p.queue, lambda v: "(default)" if v is None else str(v)),
    ("max_concurrency", lambda p: p.max_concurrency,
     lambda v: "(unlimited)" if v is None else str(v)),
    ("input_schema", lambda p: dict(p.input_schema), _json),
    ("description", lambda p: p.description, json.dumps),
)


@dataclass(frozen=True)
class SettingChange:
    """One setting of a processor version that differs, shown as the manifest writes it."""

    setting: str
    old: str
    new: str


@dataclass(frozen=True)
class Changed:
    """A processor version present in both manifests with a different image or settings."""

    old: Processor
    new: Processor
    settings: tuple[SettingChange, ...]

    @property
    def repinned(self) -> bool:
        """True when the version now points at another image (digest or repository)."""
        return self.old.image != self.new.image


@dataclass(frozen=True)
class ManifestDiff:
    old_revision: str
    new_revision: str
    added: tuple[Processor, ...]
    removed: tuple[Processor, ...]
    changed: tuple[Changed, ...]

    @property
    def equal(self) -> bool:
        """True when both manifests allow exactly the same thing."""
        return not (self.added or self.removed or self.changed)

    @property
    def exit_code(self) -> int:
        return EXIT_SAME if self.equal else EXIT_DIFFERENT

    def lines(self) -> Iterator[str]:
        """Human-readable report: `+` added, `-` removed, `~` changed, one per version."""
        for proc in self.added:
            yield f"+ {proc.name} {proc.version}: {proc.image}"
        for proc in self.removed:
            yield f"- {proc.name} {proc.version}: {proc.image}"
        for change in self.changed:
            head = f"~ {change.new.name} {change.new.version}:"
            if change.repinned:
                if change.old.repo == change.new.repo:
                    yield f"{head} re-pinned {change.old.digest} -> {change.new.digest}"
                else:
                    yield f"{head} re-pinned {change.old.image} -> {change.new.image}"
            else:
                yield f"{head} settings changed"
            for setting in change.settings:
                yield f"    {setting.setting}: {setting.old} -> {setting.new}"

    def summary(self) -> str:
        if self.equal:
            return "no differences"
        repinned = sum(1 for c in self.changed if c.repinned)
        return (f"{len(self.added)} added, {len(self.removed)} removed, {repinned} re-pinned, "
                f"{len(self.changed) - repinned} with changed settings only")

    def as_json(self) -> dict[str, Any]:
        """The report as one JSON-ready object (`runner manifest diff --json`)."""
        def entry(proc: Processor) -> dict[str, Any]:
            return {"name": proc.name, "version": proc.version, "image": proc.image,
                    "digest": proc.digest}

        return {
            "equal": self.equal,
            "old_revision": self.old_revision,
            "new_revision": self.new_revision,
            "added": [entry(p) for p in self.added],
            "removed": [entry(p) for p in self.removed],
            "changed": [
                {"name": c.new.name, "version": c.new.version, "repinned": c.repinned,
                 "old_image": c.old.image, "new_image": c.new.image,
                 "old_digest": c.old.digest, "new_digest": c.new.digest,
                 "settings": [{"setting": s.setting, "old": s.old, "new": s.new}
                              for s in c.settings]}
                for c in self.changed
            ],
        }


def _setting_changes(old: Processor, new: Processor) -> tuple[SettingChange, ...]:
    changes = []
    for name, read, show in _SETTINGS:
        before, after = read(old), read(new)
        if before != after:
            changes.append(SettingChange(name, show(before), show(after)))
    return tuple(changes)


def _order(proc: Processor) -> tuple[str, str]:
    return (proc.name, proc.version)


def diff_manifests(old: Manifest, new: Manifest) -> ManifestDiff:
    """Compare two manifests processor version by processor version (name + version)."""
    before = {_order(p): p for p in old.processors}
    after = {_order(p): p for p in new.processors}
    changed = []
    for key in sorted(before.keys() & after.keys()):
        was, now = before[key], after[key]
        settings = _setting_changes(was, now)
        if settings or was.image != now.image:
            changed.append(Changed(old=was, new=now, settings=settings))
    return ManifestDiff(
        old_revision=old.revision,
        new_revision=new.revision,
        added=tuple(after[k] for k in sorted(after.keys() - before.keys())),
        removed=tuple(before[k] for k in sorted(before.keys() - after.keys())),
        changed=tuple(changed),
    )
