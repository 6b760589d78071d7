"""Reusable constrained field types shared by the four kinds.

Each type carries its own pattern and bounds, so both the CRD schema and the Python
model enforce the same rule.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# s3://bucket[/prefix], file:///absolute/path, or file:relative/path (local runner only).
STORE_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?|file:///[^\s]*|file:[^/\s][^\s]*)$"
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"

ResourceName = Annotated[str, StringConstraints(pattern=DNS1123_SUBDOMAIN, max_length=253)]
SecretName = Annotated[str, StringConstraints(pattern=DNS1123_SUBDOMAIN, max_length=253)]
StoreUri = Annotated[str, StringConstraints(pattern=STORE_URI, max_length=2048)]
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY, max_length=64)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=256)]
LongText = Annotated[str, StringConstraints(min_length=1, max_length=16384)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY, max_length=317)]
LabelValue = Annotated[str, StringConstraints(max_length=63)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFraction = Annotated[float, Field(gt=0.0, le=1.0)]
