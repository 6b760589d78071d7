"""Rules that keep one resource's outputs from destroying anything else.

`deletePolicy: Delete` removes everything under a resource's output prefix and a retry
garbage-collects files its own listing does not name, so an output must never be a bucket or
file-system root, never be spelled with `.`/`..` segments (which a store may or may not
normalise), and never equal or contain another resource's output.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

DOT_SEGMENTS = {".", ".."}


@functools.lru_cache(maxsize=65536)
def _location(uri: str) -> tuple[str, tuple[str, ...]] | None:
    """(scheme and bucket, path segments) of an absolute s3:// or file:/// URI; None for a relative one."""
    if uri.startswith("s3://"):
        bucket, _, path = uri.removeprefix("s3://").partition("/")
        return f"s3://{bucket}", tuple(segment for segment in path.split("/") if segment)
    if uri.startswith("file:///"):
        return "file://", tuple(segment for segment in uri.removeprefix("file://").split("/") if segment)
    return None


def dot_segments(uri: str) -> bool:
    """Whether the URI's path has a `.` or `..` segment."""
    path = uri.split("://", 1)[-1] if "://" in uri else uri.removeprefix("file:")
    return any(segment in DOT_SEGMENTS for segment in path.split("/"))


def output_problem(uri: str) -> str | None:
    """Why `uri` cannot be an output prefix, or None when it can."""
    if dot_segments(uri):
        return "must not contain '.' or '..' segments; write the prefix out in full"
    location = _location(uri)
    if location is not None and not location[1]:
        what = "a bucket's root" if uri.startswith("s3://") else "the file system's root"
        return f"is {what}; an output needs its own prefix (deletePolicy Delete removes everything under it)"
    return None


def overlaps(first: str, second: str) -> bool:
    """Whether two absolute outputs are equal or one lies under the other (relative ones never compare)."""
    a, b = _location(first), _location(second)
    if a is None or b is None or a[0] != b[0]:
        return False
    shorter = min(len(a[1]), len(b[1]))
    return a[1][:shorter] == b[1][:shorter]


@dataclass(frozen=True)
class ClaimedOutput:
    """Another resource's output prefix."""

    label: str
    """Kind/name (and namespace, where it differs) of the resource writing there."""
    uri: str


def overlapping(uri: str, claimed: Iterable[ClaimedOutput]) -> list[ClaimedOutput]:
    """The claimed outputs that `uri` equals, contains or lies under."""
    return [item for item in claimed if overlaps(uri, item.uri)]


def overlap_message(uri: str, others: list[ClaimedOutput]) -> str:
    names = ", ".join(f"{item.label} ({item.uri})" for item in others)
    return (f"output {uri} overlaps the output of {names}: two resources must not write or delete "
            f"under the same prefix; give each its own")
