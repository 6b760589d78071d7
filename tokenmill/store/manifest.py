"""The dataset manifest and the per-shard commit records it is merged from.

`<dataset>/_manifest.json` (written last, by one committer):

    {
      "format": "tokenmill.dataset", "format_version": 1,
      "schema": {"name": "documents", "version": 1},
      "producer": {"kind": "CorpusFilter", "name": "web", "uid": "…", "generation": 2,
                   "attempt": 1},
      "created_at": "2025-01-01T00:00:00Z", "committed_at": "2025-01-01T00:10:00Z",
      "summary": {"shards": 2, "rows": 2000, "bytes": 123456, "tokens": null},
      "shards": [{"shard": "part-000000", "path": "part-000000.3f9a1c2b7d4e.parquet",
                  "rows": 1000, "bytes": 61728, "sha256": "…", "tokens": null,
                  "attempt": 1, "written_at": "2025-01-01T00:05:00Z"}, …],
      "stats": {"kept": 1990, "bytesIn": 234567, …}
    }

`stats` (optional, absent unless the producer gave one) is the producing workload's own
statistics as a small JSON object (a CorpusFilter's funnel, a synthetic job's per-step counts,
a PTS job's search figures): at most `MAX_STATS_BYTES` serialised, a few KiB in practice.
Adding it did not change `format_version`: older readers ignore it, and manifests without it
still read.

`<dataset>/_commits/<shard>.json` holds one shard entry plus the schema and producer, so a
worker commits its shard with one PUT of its own and no worker rewrites a shared file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from tokenmill.store.errors import ManifestError

FORMAT = "tokenmill.dataset"
FORMAT_VERSION = 1
MAX_STATS_BYTES = 64 * 1024
"""The most a manifest's `stats` may take as compact JSON: statistics, not data."""
COMMITS_DIR = "_commits"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def shard_name(shard: int | str) -> str:
    """The name of a shard: an int n becomes 'part-%06d', a string is checked and kept."""
    if isinstance(shard, bool):
        raise ValueError(f"invalid shard id {shard!r}")
    if isinstance(shard, int):
        if shard < 0:
            raise ValueError(f"shard number must not be negative: {shard}")
        return f"part-{shard:06d}"
    if not isinstance(shard, str) or not _SHARD_NAME.match(shard) or shard.endswith(".json"):
        raise ValueError(
            f"invalid shard id {shard!r}: use an int or 1-200 characters of A-Z a-z 0-9 . _ = -"
        )
    return shard


def parse_json(data: bytes, where: str) -> Any:
    """Decode a manifest or commit record, raising ManifestError if it is not JSON."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{where} is not valid JSON ({exc})", where) from exc


def check_stats(stats: Any) -> dict[str, Any]:
    """`stats` as a plain dict ready for the manifest; ValueError unless it is a JSON object of
    finite values with string keys within MAX_STATS_BYTES."""
    if not isinstance(stats, Mapping):
        raise ValueError(f"dataset stats must be a mapping, not {type(stats).__name__}")
    try:
        encoded = json.dumps(stats, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dataset stats are not JSON-serialisable: {exc}") from exc
    if len(encoded.encode()) > MAX_STATS_BYTES:
        raise ValueError(f"dataset stats take {len(encoded.encode())} bytes as JSON; at most "
                         f"{MAX_STATS_BYTES} fit in a manifest")
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded


def commit_record_key(shard: str) -> str:
    return f"{COMMITS_DIR}/{shard}.json"


@dataclass(frozen=True)
class Producer:
    """The resource (and attempt) that produced data: recorded, and used to tell stale data."""

    kind: str = ""
    name: str = ""
    uid: str = ""
    generation: int = 0
    attempt: int = 0

    def same_run(self, other: Producer) -> bool:
        """Whether `other` is this resource at this generation (any attempt)."""
        return (self.uid, self.generation) == (other.uid, other.generation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Producer:
        return cls(
            kind=str(data.get("kind", "")),
            name=str(data.get("name", "")),
            uid=str(data.get("uid", "")),
            generation=int(data.get("generation", 0)),
            attempt=int(data.get("attempt", 0)),
        )


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard; `path` is relative to the dataset's URI."""

    shard: str
    path: str
    rows: int
    bytes: int
    sha256: str
    tokens: int | None = None
    attempt: int = 0
    written_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> ShardInfo:
        try:
            info = cls(
                shard=shard_name(str(data["shard"])),
                path=str(data["path"]),
                rows=int(data["rows"]),
                bytes=int(data["bytes"]),
                sha256=str(data["sha256"]),
                tokens=None if data.get("tokens") is None else int(data["tokens"]),
                attempt=int(data.get("attempt", 0)),
                written_at=str(data.get("written_at", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed shard entry in {where}: {exc!r}", where) from exc
        if not _SHA256.match(info.sha256) or info.rows < 0 or info.bytes < 0:
            raise ManifestError(f"malformed shard entry {info.shard!r} in {where}", where)
        if info.path.startswith("/") or ".." in info.path.split("/"):
            raise ManifestError(f"shard {info.shard!r} in {where} has path {info.path!r}", where)
        return info


@dataclass(frozen=True)
class Summary:
    """What the operator puts into a resource's status.outputs."""

    shards: int
    rows: int
    bytes: int
    tokens: int | None

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


def _header(schema_name: str, schema_version: int, producer: Producer | None) -> dict[str, Any]:
    """The fields a manifest and a commit record share: format, schema and producer."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "schema": {"name": schema_name, "version": schema_version},
        "producer": producer.to_dict() if producer else None,
    }


@dataclass(frozen=True)
class CommitRecord:
    """`_commits/<shard>.json`: a shard, the schema it follows and who produced it."""

    shard: ShardInfo
    schema_name: str
    schema_version: int
    producer: Producer | None

    def to_dict(self) -> dict[str, Any]:
        return {
            **_header(self.schema_name, self.schema_version, self.producer),
            "shard": self.shard.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> CommitRecord:
        _check_format(data, where)
        schema = _schema_ref(data, where)
        producer = data.get("producer")
        return cls(
            shard=ShardInfo.from_dict(_mapping(data.get("shard"), where), where),
            schema_name=schema[0],
            schema_version=schema[1],
            producer=Producer.from_dict(producer) if producer else None,
        )


@dataclass(frozen=True)
class Manifest:
    """A committed dataset: exactly the shards a reader may read."""

    schema_name: str
    schema_version: int
    shards: tuple[ShardInfo, ...]
    producer: Producer | None = None
    created_at: str = ""
    committed_at: str = ""
    uri: str = field(default="", compare=False)
    stats: Mapping[str, Any] | None = field(default=None, hash=False)
    """The producing workload's statistics (see the module docstring), if it gave any."""

    @property
    def summary(self) -> Summary:
        tokens = [s.tokens for s in self.shards]
        return Summary(
            shards=len(self.shards),
            rows=sum(s.rows for s in self.shards),
            bytes=sum(s.bytes for s in self.shards),
            tokens=None
            if any(t is None for t in tokens)
            else sum(t for t in tokens if t is not None),
        )

    @property
    def schema_ref(self) -> str:
        return f"{self.schema_name}/{self.schema_version}"

    def shard(self, name: int | str) -> ShardInfo:
        wanted = shard_name(name)
        for info in self.shards:
            if info.shard == wanted:
                return info
        raise KeyError(f"{self.uri or 'dataset'} has no committed shard {wanted!r}")

    def to_dict(self) -> dict[str, Any]:
        data = {
            **_header(self.schema_name, self.schema_version, self.producer),
            "created_at": self.created_at,
            "committed_at": self.committed_at,
            "summary": self.summary.as_dict(),
            "shards": [s.to_dict() for s in self.shards],
        }
        if self.stats is not None:
            data["stats"] = dict(self.stats)
        return data

    @classmethod
    def from_dict(cls, data: Any, uri: str = "") -> Manifest:
        where = uri or "manifest"
        _check_format(data, where)
        name, version = _schema_ref(data, where)
        raw_shards = data.get("shards")
        if not isinstance(raw_shards, list):
            raise ManifestError(f"{where} has no shard list", uri)
        shards = tuple(ShardInfo.from_dict(_mapping(s, where), where) for s in raw_shards)
        names = [s.shard for s in shards]
        if len(set(names)) != len(names):
            raise ManifestError(f"{where} lists a shard twice", uri)
        producer = data.get("producer")
        stats = data.get("stats")
        if stats is not None and not isinstance(stats, Mapping):
            raise ManifestError(f"{where} has stats that are not a JSON object", uri)
        return cls(
            schema_name=name,
            schema_version=version,
            shards=shards,
            producer=Producer.from_dict(producer) if producer else None,
            created_at=str(data.get("created_at", "")),
            committed_at=str(data.get("committed_at", "")),
            uri=uri,
            stats=dict(stats) if stats is not None else None,
        )


def _check_format(data: Any, where: str) -> None:
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ManifestError(f"{where} is not a {FORMAT} document", where)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where} has format_version {version!r}; this tokenmill reads {FORMAT_VERSION}", where
        )


def _schema_ref(data: Mapping[str, Any], where: str) -> tuple[str, int]:
    schema = data.get("schema")
    if not isinstance(schema, Mapping) or not schema.get("name"):
        raise ManifestError(f"{where} names no schema", where)
    try:
        return str(schema["name"]), int(schema["version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{where} has a malformed schema version", where) from exc


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ManifestError(f"malformed entry in {where}", where)
    return value
