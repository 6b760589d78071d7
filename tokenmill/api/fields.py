"""Reusable constrained field types shared by the four kinds.

Each type carries its own pattern and bounds, so both the CRD schema and the Python
model enforce the same rule.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints, WithJsonSchema

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# s3://bucket[/prefix], file:///absolute/path, or file:relative/path (local runner only).
STORE_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?|file:///[^\s]*|file:[^/\s][^\s]*)$"
# A non-negative Kubernetes quantity (apimachinery's resource.Quantity grammar without a sign):
# digits with an optional fraction, then a binary (Ki..Ei) or decimal (n, u, m, k, M..E) suffix
# or an exponent. Negative amounts are quantities but no container may request them.
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+))?$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
# A label value: empty, or at most 63 alphanumerics, '-', '_' and '.', starting and ending alphanumeric.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# An http(s) URL without user:password@ before the host.
ENDPOINT = r"^https?://[^\s/@?#]+([/?#][^\s]*)?$"

# A container image reference: no white space (the API server refuses leading or trailing spaces).
IMAGE = r"^[^\s]+$"

PATTERN_MEANINGS = {
    IMAGE: "must be a container image reference without white space",
    DNS1123_SUBDOMAIN: "must be a DNS subdomain: lower-case letters, digits, '-' and '.', "
                       "beginning and ending with a letter or digit",
    STORE_URI: "must be a store URI: s3://bucket/prefix or file:///absolute/path (file:relative/path for the "
               "local runner)",
    QUANTITY: "must be a Kubernetes quantity such as 4, 500m, 1.5 or 16Gi (no sign)",
    LABEL_KEY: "must be a label key: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, "
               "'-', '_' or '.', beginning and ending with a letter or digit",
    LABEL_VALUE: "must be a label value: at most 63 letters, digits, '-', '_' or '.', beginning and ending with "
                 "a letter or digit",
}
"""What each pattern means, for error messages."""

ResourceName = Annotated[str, StringConstraints(pattern=DNS1123_SUBDOMAIN, max_length=253)]
SecretName = Annotated[str, StringConstraints(pattern=DNS1123_SUBDOMAIN, max_length=253)]
StoreUri = Annotated[str, StringConstraints(pattern=STORE_URI, max_length=2048)]
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY, max_length=64)]
ImageName = Annotated[str, StringConstraints(pattern=IMAGE, min_length=1, max_length=512)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=256)]
LongText = Annotated[str, StringConstraints(min_length=1, max_length=16384)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY, max_length=317)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE, max_length=63)]
QueueName = Annotated[str, StringConstraints(pattern=LABEL_VALUE, min_length=1, max_length=63)]
"""A Kueue LocalQueue's name: it becomes the value of the kueue.x-k8s.io/queue-name label."""


def _endpoint(url: str) -> str:
    if not re.match(r"^https?://", url):
        raise ValueError("must be an http:// or https:// URL")
    if re.match(r"^https?://[^/?#]*@", url):
        raise ValueError("must not carry credentials (user:password@ before the host); "
                         "give the API key in apiKeySecret")
    if re.search(r"\s", url):
        raise ValueError("must not contain white space")
    return url


Endpoint = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(_endpoint),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 2048, "pattern": ENDPOINT}),
]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
"""An RFC 3339 time, such as 2026-01-31T12:00:00Z."""
# metav1.Condition's type: a CamelCase name, optionally prefixed by a DNS subdomain and '/'.
CONDITION_TYPE = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
ConditionTypeName = Annotated[str, StringConstraints(pattern=CONDITION_TYPE, max_length=316)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFraction = Annotated[float, Field(gt=0.0, le=1.0)]
