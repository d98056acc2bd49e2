"""The manifest layer: which processor versions may run, on which pinned image.

Owns the allowlist's model (`model`), its parsing and validation with every problem
named by line (`parse`), reading and writing its YAML safely (`yamlio`: no anchors,
no repeated keys, a size cap), the bounded validator of an `input_schema`
(`inputschema`), hot reload in long-running processes (`source`), pinning an entry
(`pin`) and comparing two manifests (`diff`).

May import: `runner.errors` and `runner.units` only. Every other layer may import
it; it knows nothing of Docker, the database or HTTP.
"""

from runner.manifest.model import (
    DEFAULT_RETRY_ON,
    IMAGE_REF,
    Accepts,
    Limits,
    Manifest,
    Processor,
    RetryPolicy,
)
from runner.manifest.parse import iter_problems, load_manifest, parse_manifest, revision_of, schema
from runner.manifest.pin import entry_for, pin
from runner.manifest.source import ManifestSource

__all__ = [
    "DEFAULT_RETRY_ON", "IMAGE_REF", "Accepts", "Limits", "Manifest", "ManifestSource", "Processor",
    "RetryPolicy", "entry_for", "iter_problems", "load_manifest", "parse_manifest", "pin",
    "revision_of", "schema",
]
