"""Parsing and joining store URIs: `s3://bucket/prefix`, `file:///abs/path` or a local path."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from tokenmill.store.errors import InvalidURIError

ALLOWED = "s3://bucket/prefix, file:///absolute/path or a local path"

# S3's rules for new bucket names (3-63 characters, lower case, no '..', not an IP address).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class StoreURI:
    """A parsed store location.

    For `s3`, `bucket` is the bucket and `path` the key prefix without leading or trailing
    slashes. For `file`, `bucket` is empty and `path` is an absolute, normalised path.
    """

    scheme: str
    bucket: str
    path: str

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return "file://" + quote(self.path, safe="/:@!$&'()*+,;=-._~")

    @property
    def uri(self) -> str:
        return str(self)

    def join(self, *parts: str) -> StoreURI:
        """The location `parts` below this one; each part may hold several segments."""
        segments = [s for part in parts for s in _segments(part, f"{self}/{part}")]
        if not segments:
            return self
        if self.scheme == "s3":
            path = "/".join([self.path, *segments]) if self.path else "/".join(segments)
            return StoreURI("s3", self.bucket, path)
        return StoreURI("file", "", os.path.join(self.path, *segments))


def parse_uri(uri: str | StoreURI) -> StoreURI:
    """Parse a store URI, raising InvalidURIError that names the URI and what is allowed."""
    if isinstance(uri, StoreURI):
        return uri
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidURIError(f"empty store URI {uri!r}; allowed: {ALLOWED}", str(uri))
    if uri != uri.strip():
        raise InvalidURIError(f"store URI {uri!r} has surrounding whitespace", uri)
    match = _URI_SCHEME.match(uri)
    if match is None:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and not uri.startswith("file:"):
            raise InvalidURIError(f"unsupported store URI {uri!r}; allowed: {ALLOWED}", uri)
        if uri.startswith("file:"):
            raise InvalidURIError(
                f"malformed file URI {uri!r}: write file:///absolute/path; allowed: {ALLOWED}", uri
            )
        return StoreURI("file", "", _local_path(uri, uri))
    scheme = match.group(1).lower()
    if scheme == "s3":
        return _parse_s3(uri)
    if scheme == "file":
        return _parse_file(uri)
    raise InvalidURIError(
        f"unsupported scheme {scheme!r} in store URI {uri!r}; allowed: {ALLOWED}", uri
    )


def join_uri(base: str | StoreURI, *parts: str) -> str:
    """The URI of `parts` below `base`, in canonical form."""
    return str(parse_uri(base).join(*parts))


def normalize_uri(uri: str | StoreURI) -> str:
    """The canonical spelling of a store URI (local paths become file:// URIs)."""
    return str(parse_uri(uri))


def _parse_s3(uri: str) -> StoreURI:
    parts = urlsplit(uri)
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise InvalidURIError(f"S3 URI {uri!r} must not have a query or fragment", uri)
    bucket = parts.netloc
    if not bucket:
        raise InvalidURIError(f"S3 URI {uri!r} has no bucket; write s3://bucket/prefix", uri)
    if "@" in bucket or ":" in bucket:
        raise InvalidURIError(
            f"S3 URI {uri!r} must not carry credentials or a port; the endpoint comes from "
            "AWS_ENDPOINT_URL and credentials from the environment or a Secret",
            uri,
        )
    if not _BUCKET.match(bucket) or ".." in bucket or _IPV4.match(bucket):
        raise InvalidURIError(
            f"invalid bucket name {bucket!r} in {uri!r}: 3-63 characters of a-z, 0-9, '.' "
            "and '-', starting and ending with a letter or digit",
            uri,
        )
    return StoreURI("s3", bucket, "/".join(_segments(parts.path, uri)))


def _parse_file(uri: str) -> StoreURI:
    parts = urlsplit(uri)
    if parts.query or parts.fragment:
        raise InvalidURIError(f"file URI {uri!r} must not have a query or fragment", uri)
    if parts.netloc not in ("", "localhost"):
        raise InvalidURIError(
            f"file URI {uri!r} names host {parts.netloc!r}; write file:///absolute/path", uri
        )
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidURIError(f"file URI {uri!r} needs an absolute path (file:///...)", uri)
    return StoreURI("file", "", _local_path(path, uri))


def _local_path(path: str, uri: str) -> str:
    if "\x00" in path:
        raise InvalidURIError(f"store URI {uri!r} contains a NUL byte", uri)
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _segments(path: str, uri: str) -> list[str]:
    segments = [s for s in path.split("/") if s]
    for segment in segments:
        if segment in (".", ".."):
            raise InvalidURIError(f"store URI {uri!r} must not contain '.' or '..' segments", uri)
    return segments
