"""`runner manifest pin`: add or re-pin one entry in a manifest file, atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from runner.errors import ManifestError
from runner.manifest.model import Manifest
from runner.manifest.parse import image_problem, load_manifest, parse_manifest
from runner.manifest.yamlio import YamlLoader, dump_manifest


def entry_for(*, name: str, version: str, image: str) -> dict[str, Any]:
    """A manifest entry pinning `image` for a processor version."""
    if image_problem(image):
        raise ManifestError(f"{name} {version}: {image_problem(image)}")
    return {"name": name, "version": version, "image": image}


def pin(path: Path, entry: Mapping[str, Any]) -> Manifest:
    """Add or re-pin a processor entry in the manifest file at `path`.

    Other entries keep their settings; a missing file is created. The result is
    validated before it replaces the file, so a failed pin changes nothing.

    Raises:
        ManifestError: the file is invalid, or would be after the change.
    """
    data: dict[str, Any] = {"version": 1, "processors": []}
    if path.exists():
        load_manifest(path)  # refuse to edit a file that is already broken
        loaded = yaml.load(path.read_text(), Loader=YamlLoader)  # noqa: S506
        if isinstance(loaded, dict):
            data = loaded
    processors: list[dict[str, Any]] = list(data.get("processors") or [])
    for existing in processors:
        if existing.get("name") == entry["name"] and existing.get("version") == entry["version"]:
            existing.update(entry)
            break
    else:
        processors.append(dict(entry))
    data["processors"] = processors
    text = dump_manifest(data)
    manifest = parse_manifest(text, source=str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return manifest
