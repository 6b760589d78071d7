"""Test-only: turn recorded HTTP calls into RBAC terms (apiGroup, resource, verb) and expand rules."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from tests.operator.emulator import Call

OPERATOR_AGENTS = ("kopf/", "tokenmill-operator/")
_CORE = re.compile(r"^/api/v1(?P<rest>/.*)?$")
_GROUPED = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)(?P<rest>/.*)?$")


def rbac_terms(call: Call) -> tuple[str, str, str] | None:
    """(apiGroup, resource[/subresource], verb) of a resource request; None for discovery."""
    match = _CORE.match(call.path)
    if match:
        group, rest = "", match.group("rest") or ""
    else:
        match = _GROUPED.match(call.path)
        if not match:
            return None  # /api, /apis, /version: non-resource URLs (discovery)
        group, rest = match.group("group"), match.group("rest") or ""
    parts = [part for part in rest.split("/") if part]
    if not parts:
        return None  # /api/v1, /apis/group/version: discovery
    if parts[0] == "namespaces" and len(parts) >= 3:
        parts = parts[2:]  # /namespaces/<ns>/<plural>/...
    resource, name, subresource = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None
    watching = call.query.get("watch") in ("true", "True", "1")
    verb = {
        "GET": "watch" if watching else ("get" if name else "list"),
        "POST": "create",
        "PATCH": "patch",
        "PUT": "update",
        "DELETE": "delete" if name else "deletecollection",
    }[call.method]
    return group, f"{resource}/{subresource}" if subresource else resource, verb


def operator_terms(calls: Iterable[Call]) -> set[tuple[str, str, str]]:
    terms = set()
    for call in calls:
        if call.user_agent.startswith(OPERATOR_AGENTS):
            term = rbac_terms(call)
            if term is not None:
                terms.add(term)
    return terms


def granted(rules: Iterable[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) a ClusterRole's rules grant (no wildcards allowed)."""
    out = set()
    for rule in rules:
        for part in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[part], f"wildcard in {part}: {rule}"
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out
