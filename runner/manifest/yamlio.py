"""Reading and writing manifest YAML so that the text means what it shows.

`load_yaml` composes a manifest with `YamlLoader`: YAML 1.2 booleans, no anchors or
aliases (a few lines of them expand into millions of nodes), no repeated keys (the
last would silently win), every problem named by line; `read_text` refuses a file
over `MAX_MANIFEST_BYTES` before reading it whole; `dump_manifest` writes YAML that
this reader accepts (no anchors, even for an object used twice).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
import yaml.composer
import yaml.constructor

from runner.errors import ManifestError

# A manifest is a short list of entries; past this it is refused before it is parsed.
MAX_MANIFEST_BYTES = 1024 * 1024


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""

    def __init__(self, key: object, first: yaml.Node, again: yaml.Node) -> None:
        self.key, self.key_node = key, again
        first_line, again_line = first.start_mark.line + 1, again.start_mark.line + 1
        super().__init__(None, None, f"duplicate key {key!r} (first at line {first_line}, "
                         f"again at line {again_line}): YAML keys must be unique",
                         again.start_mark)


class _PlainDumper(yaml.SafeDumper):
    """SafeDumper that writes a value used twice out twice: a manifest holds no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_manifest(data: Any) -> str:
    """YAML for a manifest (or a piece of one) that this parser accepts: keys in their
    given order, and no anchors or aliases even where the same object appears twice."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False)


class YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: `on`, `off`, `yes`, `no` stay strings.

    The manifest's retry policy has an `on:` key, which YAML 1.1 would read as True.
    It refuses an anchor or alias (each value is written out, so a few lines cannot
    expand into millions of nodes) and a key given twice in one mapping (YAML says keys
    are unique; PyYAML would let the last one silently win).
    """

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        anchor, mark = getattr(event, "anchor", None), getattr(event, "start_mark", None)
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"a YAML alias (*{anchor}) is not allowed in a manifest: "
                "write each value out", mark)
        if anchor is not None:
            raise yaml.composer.ComposerError(
                None, None, f"a YAML anchor (&{anchor}) is not allowed in a manifest: "
                "write each value out", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader refuses it below
                continue
            if first is not key_node:
                raise DuplicateKeyError(key, first, key_node)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError as exc:  # e.g. over Python's 4,300 digits for an int
            raise yaml.constructor.ConstructorError(
                None, None, f"{str(node.value)[:20]}... is not a usable integer ({exc})",
                node.start_mark) from exc


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
YamlLoader.add_constructor("tag:yaml.org,2002:int", YamlLoader.construct_yaml_int)


def _path_to(root: yaml.Node, target: yaml.Node) -> list[str | int]:
    """The path of the mapping key or value `target` under `root` (empty if not found)."""
    stack: list[tuple[yaml.Node, list[str | int]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = [*path, key.value]
                if target is key or target is value:
                    return child
                stack.append((value, child))
        elif isinstance(node, yaml.SequenceNode):
            for index, value in enumerate(node.value):
                if target is value:
                    return [*path, index]
                stack.append((value, [*path, index]))
    return []


def load_yaml(text: str, *, source: str = "<string>") -> tuple[yaml.Node | None, Any]:
    """The YAML node tree and data of `text`, read once by `YamlLoader`.

    Raises:
        ManifestError: over MAX_MANIFEST_BYTES, not YAML, an anchor or alias, a
            duplicate key, or nested too deeply; the problem names the line.
    """
    size = len(text.encode(errors="surrogatepass"))
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(problems=[f"{source}: the manifest is {size} bytes, over the "
                                      f"{MAX_MANIFEST_BYTES // 1024**2} MiB cap"], source=source)
    loader = YamlLoader(text)
    root: yaml.Node | None = None
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    except DuplicateKeyError as exc:
        line = exc.key_node.start_mark.line + 1
        where = path_text(_path_to(root, exc.key_node)) if root is not None else "(document)"
        raise ManifestError(problems=[f"{source}:{line}: {where}: {exc.problem}"],
                            source=source) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(problems=[f"{source}{line}: not valid YAML: {problem}"],
                            source=source) from exc
    except RecursionError:
        raise ManifestError(problems=[f"{source}: not valid YAML: nested too deeply"],
                            source=source) from None
    finally:
        loader.dispose()


def line_of(node: yaml.Node | None, path: list[str | int]) -> int | None:
    """1-based line of the YAML node at `path`, or of its deepest existing parent."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in path:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    child = value
                    break
        elif (isinstance(node, yaml.SequenceNode) and isinstance(part, int)
              and 0 <= part < len(node.value)):
            child = node.value[part]
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    return line


def path_text(path: list[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


def read_text(path: Path) -> str:
    """The manifest file's text, read no further than its size cap.

    Raises:
        ManifestError: the file cannot be read, is over MAX_MANIFEST_BYTES or is not
            UTF-8.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
            size = max(len(data), os.fstat(handle.fileno()).st_size)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror}",
                            source=str(path)) from exc
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(problems=[f"{path}: the manifest is {size} bytes, over the "
                                      f"{MAX_MANIFEST_BYTES // 1024**2} MiB cap"],
                            source=str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: the manifest is not UTF-8 text (byte {exc.start})",
                            source=str(path)) from exc
