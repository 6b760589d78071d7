"""Reads recipe YAML defensively: bounded size, depth and alias expansion, no duplicate keys.

A recipe is user input that may be hostile: an alias bomb ("billion laughs") is small on disk
but expands to billions of values, deep nesting exhausts the parser's recursion, a huge file
takes minutes to validate, and a duplicated key silently drops the first value. Each is
refused with a message naming the file, line and reason, before anything is constructed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20
"""1 MiB per file: far above any recipe, below the 1.5 MiB the API server stores per object."""
MAX_DEPTH = 64
"""Nesting of mappings and lists; the deepest recipe field is about 8 levels down."""
MAX_VALUES = 20_000
"""Values (scalars, mappings, lists) per file once aliases are expanded; the full Phi-4 recipe has
fewer than 1,000 per file."""

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlInputError(ValueError):
    """Why a file cannot be read as a recipe; `where` is file[:line:column]."""

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


def _where(file: Path, mark: Any) -> str:
    return f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(file)


class _UniqueKeyLoader(_Loader):  # type: ignore[misc, valid-type]
    """The safe loader, refusing a mapping that names a key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key; the base constructor reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once in a mapping)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_shape(text: str, file: Path) -> None:
    """Depth and expanded size from the parser's events, which never recurse or expand aliases."""
    depth = 0
    # Expanded size of each open collection, and of every anchored node seen so far.
    open_sizes: list[int] = []
    open_anchors: list[str | None] = []
    anchored: dict[str, int] = {}
    total = 0

    def add(size: int, mark: Any) -> None:
        nonlocal total
        if open_sizes:
            open_sizes[-1] += size
        else:
            total += size
        if total + sum(open_sizes) > MAX_VALUES:
            raise YamlInputError(_where(file, mark), f"expands to more than {MAX_VALUES:,} values "
                                                     "(aliases included); a recipe is far smaller")

    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlInputError(_where(file, event.start_mark), f"nested more than {MAX_DEPTH} levels deep")
            open_sizes.append(1)
            open_anchors.append(event.anchor)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
            size, anchor = open_sizes.pop(), open_anchors.pop()
            if anchor is not None:
                anchored[anchor] = size
            add(size, event.start_mark)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchored[event.anchor] = 1
            add(1, event.start_mark)
        elif isinstance(event, yaml.AliasEvent):
            add(anchored.get(event.anchor, 1), event.start_mark)


def read_yaml_documents(file: Path) -> list[Any]:
    """The YAML documents of `file`; raises YamlInputError naming where and why it cannot be read."""
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise YamlInputError(str(file), f"is {size:,} bytes; a recipe file may hold at most {MAX_FILE_BYTES:,}")
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise YamlInputError(str(file), f"cannot read: {error}") from None
    try:
        _check_shape(text, file)
        return list(yaml.load_all(text, Loader=_UniqueKeyLoader))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        reason = getattr(error, "problem", None) or str(error)
        raise YamlInputError(_where(file, mark), f"malformed YAML: {reason}") from None
