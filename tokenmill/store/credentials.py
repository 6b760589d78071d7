"""Where the S3 endpoint and credentials come from.

Resolution, first match wins for each value:

1. `TOKENMILL_S3_CREDENTIALS_DIR`: a directory holding one file per value, as a Kubernetes
   Secret mounted as a volume gives it: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`
   (both required there), optional `AWS_SESSION_TOKEN`, `AWS_ENDPOINT_URL`, `AWS_REGION`.
   The files are read each time a store is opened, so a rotated Secret is picked up.
2. The environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
   `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_REGION` or `AWS_DEFAULT_REGION`.
3. Otherwise no explicit keys: boto3 and pyarrow use the AWS SDK default chain
   (web identity / IRSA, instance profile, ~/.aws).

Tuning: `TOKENMILL_S3_CONNECT_TIMEOUT_S` (default 10), `TOKENMILL_S3_READ_TIMEOUT_S`
(default 60) and `TOKENMILL_S3_ADDRESSING_STYLE` (`path`, `virtual` or `auto`; default
`path` when an endpoint is set, since most S3-compatible servers need it, else `auto`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tokenmill.store.errors import InvalidCredentialsError, InvalidURIError

CREDENTIALS_DIR_ENV = "TOKENMILL_S3_CREDENTIALS_DIR"
_DIR_FILES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
)


@dataclass(frozen=True)
class S3Settings:
    """Everything needed to build an S3 client. Secrets are kept out of repr()."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    addressing_style: str = "auto"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    source: str = "default-chain"

    def secrets(self) -> tuple[str, ...]:
        """The values that must never appear in a message."""
        values = (self.access_key_id, self.secret_access_key, self.session_token)
        return tuple(v for v in values if v)

    def cache_key(self) -> str:
        """A digest identifying these settings, usable as a dictionary key without the secrets."""
        raw = "\x00".join(
            str(v)
            for v in (
                self.endpoint_url,
                self.region,
                self.access_key_id,
                self.secret_access_key,
                self.session_token,
                self.addressing_style,
                self.connect_timeout_s,
                self.read_timeout_s,
            )
        )
        return hashlib.sha256(raw.encode()).hexdigest()

    def redact(self, text: str) -> str:
        """`text` with every secret value replaced by '***'."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return text


def resolve_s3_settings(environ: Mapping[str, str] | None = None) -> S3Settings:
    """Resolve endpoint, region and credentials as the module docstring describes."""
    env = os.environ if environ is None else environ
    secret_dir = env.get(CREDENTIALS_DIR_ENV)
    from_dir = _read_credentials_dir(secret_dir) if secret_dir else {}
    key_id: str | None
    secret: str | None
    token: str | None
    if from_dir:
        key_id, secret = from_dir["AWS_ACCESS_KEY_ID"], from_dir["AWS_SECRET_ACCESS_KEY"]
        token = from_dir.get("AWS_SESSION_TOKEN")
        source = f"secret-dir:{secret_dir}"
    elif env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SECRET_ACCESS_KEY"):
        key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            raise InvalidCredentialsError(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together"
            )
        token = env.get("AWS_SESSION_TOKEN") or None
        source = "environment"
    else:
        key_id = secret = token = None
        source = "default-chain"
    endpoint = (
        from_dir.get("AWS_ENDPOINT_URL")
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or None
    )
    if endpoint:
        _check_endpoint(endpoint)
    region = (
        from_dir.get("AWS_REGION")
        or env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    style = env.get("TOKENMILL_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
    if style not in ("path", "virtual", "auto"):
        raise ValueError(
            f"TOKENMILL_S3_ADDRESSING_STYLE must be path, virtual or auto, not {style!r}"
        )
    return S3Settings(
        endpoint_url=endpoint.rstrip("/") if endpoint else None,
        region=region,
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=token,
        addressing_style=style,
        connect_timeout_s=float(env.get("TOKENMILL_S3_CONNECT_TIMEOUT_S", 10.0)),
        read_timeout_s=float(env.get("TOKENMILL_S3_READ_TIMEOUT_S", 60.0)),
        source=source,
    )


def _read_credentials_dir(directory: str) -> dict[str, str]:
    root = Path(directory)
    if not root.is_dir():
        raise InvalidCredentialsError(f"{CREDENTIALS_DIR_ENV}={directory} is not a directory")
    values: dict[str, str] = {}
    for name in _DIR_FILES:
        path = root / name
        if path.is_file():
            value = path.read_text().strip()
            if value:
                values[name] = value
    missing = [n for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if n not in values]
    if missing:
        raise InvalidCredentialsError(
            f"credentials directory {directory} lacks {', '.join(missing)} "
            "(one file per key, as a mounted Secret provides)"
        )
    return values


def _check_endpoint(endpoint: str) -> None:
    parts = urlsplit(endpoint)
    if parts.username or parts.password:
        raise InvalidURIError("the S3 endpoint URL (AWS_ENDPOINT_URL) must not carry credentials")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidURIError(
            f"S3 endpoint {endpoint!r} (AWS_ENDPOINT_URL) must look like http(s)://host[:port]",
            endpoint,
        )
