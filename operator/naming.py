"""Deterministic names and labels of the objects the operator creates.

A RayJob's name is a pure function of (kind, name, attempt), so an operator restarted at any
point computes the same name again and the API server's uniqueness check (409 Conflict)
makes a second RayJob for the same attempt impossible.

KubeRay derives the RayCluster's and its Services' names from the RayJob's, so the name must
be at most 47 characters and a DNS-1035 label (lower case, starts with a letter). Resource
names may be 253 characters and contain dots; such names are shortened and get a hash of
the full (kind, name), so two resources can never share a RayJob name.
"""

from __future__ import annotations

import hashlib
import re

from tokenmill.api.resources import KINDS

MAX_RAYJOB_NAME = 47
MAX_LABEL_VALUE = 63
HASH_CHARS = 8

LABEL_KIND = "tokenmill.dev/kind"
LABEL_NAME = "tokenmill.dev/name"
LABEL_ATTEMPT = "tokenmill.dev/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "tokenmill-operator"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SPEC_URI = "tokenmill.dev/spec-uri"
FINALIZER = "tokenmill.dev/delete-outputs"

_CLEAN = re.compile(r"^[a-z0-9-]+$")


def _digest(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:HASH_CHARS]


def rayjob_name(kind: str, name: str, attempt: int) -> str:
    """`<kind prefix>-<name>-<attempt>`, shortened with a hash when it does not fit.

    >>> rayjob_name("TrainingStage", "pretrain", 1)
    'ts-pretrain-1'
    """
    if attempt < 1:
        raise ValueError(f"attempts count from 1, not {attempt}")
    prefix = KINDS[kind].prefix
    suffix = f"-{attempt}"
    plain = f"{prefix}-{name}{suffix}"
    if len(plain) <= MAX_RAYJOB_NAME and _CLEAN.match(name):
        return plain
    # Dots become dashes, and the name is cut to fit beside the hash of the full name.
    cleaned = re.sub(r"[^a-z0-9-]", "-", name)
    budget = MAX_RAYJOB_NAME - len(prefix) - len(suffix) - HASH_CHARS - 2
    head = cleaned[:budget].strip("-")
    middle = f"{head}-{_digest(kind, name)}" if head else _digest(kind, name)
    return f"{prefix}-{middle}{suffix}"


def label_value(name: str) -> str:
    """A resource name as a label value (at most 63 characters; longer names are hashed)."""
    if len(name) <= MAX_LABEL_VALUE:
        return name
    head = name[: MAX_LABEL_VALUE - HASH_CHARS - 1].rstrip("-.")
    return f"{head}-{_digest(name)}"


def owner_selector(kind: str, name: str) -> str:
    """The label selector of every RayJob created for the resource `kind`/`name`."""
    return f"{LABEL_KIND}={kind},{LABEL_NAME}={label_value(name)}"
