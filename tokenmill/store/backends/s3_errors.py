"""Sorting S3 failures (from boto3 or pyarrow) into transient and permanent StoreErrors.

Messages carry the operation, the URI and the store's error code, never the raw text a
client library produced, so a credential can never travel into a log or a status field.
"""

from __future__ import annotations

import re
import socket

from tokenmill.store.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    InvalidCredentialsError,
    ObjectNotFoundError,
    PermanentStoreError,
    StoreError,
    TransientStoreError,
)

# S3 error codes; pyarrow spells the same conditions in upper snake case (see _ARROW_CODES).
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "OperationAborted",
        "PriorRequestNotComplete",
        "BandwidthLimitExceeded",
        "EC2ThrottledException",
        "500",
        "502",
        "503",
        "504",
    }
)
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
    }
)
ACCESS_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"})
BUCKET_CODES = frozenset({"NoSuchBucket"})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchUpload"})

_ARROW_CODES = {
    "ACCESS_DENIED": "AccessDenied",
    "NO_SUCH_BUCKET": "NoSuchBucket",
    "NO_SUCH_KEY": "NoSuchKey",
    "RESOURCE_NOT_FOUND": "NotFound",
    "INVALID_ACCESS_KEY_ID": "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH": "SignatureDoesNotMatch",
    "INVALID_CLIENT_TOKEN_ID": "InvalidClientTokenId",
    "EXPIRED_TOKEN": "ExpiredToken",
    "MISSING_AUTHENTICATION_TOKEN": "InvalidToken",
    "SLOW_DOWN": "SlowDown",
    "THROTTLING": "Throttling",
    "SERVICE_UNAVAILABLE": "ServiceUnavailable",
    "INTERNAL_FAILURE": "InternalError",
    "REQUEST_TIMEOUT": "RequestTimeout",
    "REQUEST_TIME_TOO_SKEWED": "RequestTimeTooSkewed",
    "NETWORK_CONNECTION": "NetworkConnection",
}
_ARROW_ERROR = re.compile(r"AWS Error ([A-Z_]+)(?: \(HTTP status (\d{3})\))?")
_ARROW_STATUS = re.compile(r"HTTP (?:response )?(?:status|code)[: ]+(\d{3})", re.IGNORECASE)
_ARROW_NETWORK = re.compile(
    r"curl|timeout|timed out|connection (?:reset|refused|closed|aborted)|broken pipe|"
    r"couldn't connect|connect to server|transfer closed|partial file|unexpected eof|"
    r"empty reply",
    re.IGNORECASE,
)


def classify_code(code: str, status: int | None, uri: str, operation: str) -> StoreError:
    """The StoreError for an S3 error code and HTTP status."""
    where = f"{operation} {uri}"
    if code in BUCKET_CODES:
        return BucketNotFoundError(f"{where}: the bucket does not exist ({code})", uri)
    if code in CREDENTIAL_CODES:
        return InvalidCredentialsError(
            f"{where}: the store rejected the credentials ({code}); check the mounted Secret "
            "or the AWS_* environment",
            uri,
        )
    if code in ACCESS_CODES or status == 403:
        return AccessDeniedError(
            f"{where}: access denied ({code}); the credentials lack permission here", uri
        )
    if code in NOT_FOUND_CODES or status == 404:
        return ObjectNotFoundError(f"{where}: no such object ({code})", uri)
    detail = code if status is None or code == str(status) else f"{code}, HTTP {status}"
    if code in TRANSIENT_CODES or status == 429 or (status is not None and status >= 500):
        return TransientStoreError(f"{where}: transient error ({detail})", uri)
    return PermanentStoreError(f"{where}: request failed ({detail})", uri)


def classify_s3_exception(exc: BaseException, uri: str, operation: str) -> StoreError:
    """The StoreError an exception from boto3, botocore, urllib3 or pyarrow stands for."""
    import botocore.exceptions as bce

    where = f"{operation} {uri}"
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return classify_code(str(error.get("Code", status)), status, uri, operation)
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return InvalidCredentialsError(
            f"{where}: no S3 credentials found (set TOKENMILL_S3_CREDENTIALS_DIR or AWS_*)", uri
        )
    if isinstance(
        exc,
        (
            bce.HTTPClientError,
            bce.ResponseStreamingError,
            bce.IncompleteReadError,
            ConnectionError,
            TimeoutError,
            socket.timeout,
        ),
    ):
        return TransientStoreError(f"{where}: connection problem ({type(exc).__name__})", uri)
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFoundError(f"{where}: no such object", uri)
    if isinstance(exc, OSError):
        return _classify_arrow(str(exc), uri, operation)
    if _is_urllib3_error(exc):
        return TransientStoreError(f"{where}: connection problem ({type(exc).__name__})", uri)
    return StoreError(f"{where}: unexpected {type(exc).__name__}", uri)


def describe_exception(exc: BaseException, limit: int = 240) -> str:
    """A short account of a client exception for a message: the server's message for an
    S3 error response, the client's words otherwise. Redact it before use."""
    import botocore.exceptions as bce

    if isinstance(exc, bce.ClientError):
        text = str(exc.response.get("Error", {}).get("Message", "") or "")
    elif isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)):
        text = str(exc).split(" operation: ", 1)[-1]
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _classify_arrow(text: str, uri: str, operation: str) -> StoreError:
    match = _ARROW_ERROR.search(text)
    status_match = _ARROW_STATUS.search(text)
    status = int(status_match.group(1)) if status_match else None
    if match:
        if match.group(2):
            status = int(match.group(2))
        code = _ARROW_CODES.get(match.group(1), match.group(1))
        if code == "NetworkConnection":
            return TransientStoreError(f"{operation} {uri}: connection problem", uri)
        if code in ("UNKNOWN", "NotFound") and status is not None:
            code = str(status)
        return classify_code(code, status, uri, operation)
    if status is not None:
        return classify_code(str(status), status, uri, operation)
    if _ARROW_NETWORK.search(text):
        return TransientStoreError(f"{operation} {uri}: connection problem", uri)
    return StoreError(f"{operation} {uri}: I/O error from the S3 filesystem", uri)


def _is_urllib3_error(exc: BaseException) -> bool:
    try:
        import urllib3.exceptions
    except ImportError:
        return False
    return isinstance(exc, (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError))
