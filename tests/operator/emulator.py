"""Test-only: kmock's Kubernetes emulator with the API-server behaviour the operator relies on.

kmock 0.8's `KubernetesEmulator` serves discovery, stores objects and streams watch events,
but it is a plain JSON store. This subclass fills the gaps, in test code only:

- `GET /api/v1/namespaces[/<name>]` (kmock's path parser crashes on it): served from a
  namespace set.
- Object identity: `uid`, `resourceVersion` (one global counter, as etcd's revision),
  `generation` (bumped when `spec` changes), `creationTimestamp`, `generateName`.
- The `status` subresource: a PATCH of the object ignores `status`; a PATCH of `/status`
  changes only `status` (for resources registered with the subresource).
- Optimistic concurrency: a merge patch naming a stale `metadata.resourceVersion` fails with
  409; JSON patches with a failing `test` op fail with 422 (kopf relies on both).
- Finalizers and deletion: DELETE of an object with finalizers sets `deletionTimestamp`; the
  object goes when the last finalizer is removed. Garbage collection: when an object goes,
  every object whose `ownerReferences` name its uid is deleted too (background cascade).
- Lists: `labelSelector` (=, ==, !=, exists, !exists, in, notin), `kind`/`apiVersion` on the
  list and its items, and a real `resourceVersion`.
- Watches: `watch=True` (the `kubernetes` client's spelling) as well as `watch=true`.
- Every request is recorded with its user agent (`calls`), for the RBAC test.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import enums, k8s, rendering

NAMESPACES_PATH = re.compile(r"^/api/v1/namespaces/?(?P<name>[^/]+)?/?$")


@dataclass(frozen=True)
class Call:
    """One HTTP request the emulator received."""

    method: str
    path: str
    query: Mapping[str, str]
    user_agent: str
    content_type: str


@dataclass(frozen=True)
class ResourceSpec:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @functools.cached_property
    def key(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def parse_selector(text: str) -> list[tuple[str, str, set[str]]]:
    """Label selector requirements as (key, operator, values)."""
    requirements: list[tuple[str, str, set[str]]] = []
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    for part in (p.strip() for p in parts):
        if not part:
            continue
        match = re.match(r"^(\S+)\s+(in|notin)\s+\((.*)\)$", part)
        if match:
            values = {v.strip() for v in match.group(3).split(",") if v.strip()}
            requirements.append((match.group(1), match.group(2), values))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append((key.strip(), "!=", {value.strip()}))
        elif "==" in part or "=" in part:
            key, value = re.split(r"==?", part, maxsplit=1)
            requirements.append((key.strip(), "=", {value.strip()}))
        elif part.startswith("!"):
            requirements.append((part[1:].strip(), "!exists", set()))
        else:
            requirements.append((part, "exists", set()))
    return requirements


def matches_selector(labels: Mapping[str, str], requirements: Iterable[tuple[str, str, set[str]]]) -> bool:
    for key, operator, values in requirements:
        present = key in labels
        value = labels.get(key)
        if operator == "=" and value not in values:
            return False
        if operator == "!=" and value in values:
            return False
        if operator == "in" and (not present or value not in values):
            return False
        if operator == "notin" and present and value in values:
            return False
        if operator == "exists" and not present:
            return False
        if operator == "!exists" and present:
            return False
    return True


class Emulator(k8s.KubernetesEmulator):
    """kmock's emulator with the behaviours listed in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.specs: dict[kmock.resource, ResourceSpec] = {}
        self.namespaces: set[str] = {"default"}
        self.calls: list[Call] = []
        self.revision = 0
        self.faults: list[Any] = []
        self.after_create: list[Any] = []
        # Discovery only (kopf's "backbone" waits for these); namespaces are served in __call__.
        namespaces = self.resources["v1/namespaces"]
        namespaces.kind, namespaces.singular, namespaces.namespaced = "Namespace", "namespace", False
        namespaces.verbs = {"get", "list", "watch"}
        crds = self.resources["apiextensions.k8s.io/v1/customresourcedefinitions"]
        crds.kind, crds.singular, crds.namespaced = "CustomResourceDefinition", "customresourcedefinition", False
        crds.verbs = {"get", "list", "watch"}

    # -- set-up ---------------------------------------------------------------------------

    def register(self, spec: ResourceSpec) -> None:
        self.specs[spec.key] = spec
        info = self.resources[spec.key]
        info.kind = spec.kind
        info.singular = spec.kind.lower()
        info.namespaced = spec.namespaced
        info.verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
        info.shortnames = set(spec.short_names)
        info.categories = set(spec.categories)
        info.subresources = {"status"} if spec.status_subresource else set()

    def spec_of(self, resource: kmock.resource) -> ResourceSpec:
        spec = self.specs.get(kmock.resource(resource))
        if spec is None:
            raise k8s.KubernetesResourceNotFoundError()
        return spec

    # -- direct access for tests ----------------------------------------------------------

    def get(self, spec: ResourceSpec, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (spec.key, namespace if spec.namespaced else None, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def list(self, spec: ResourceSpec, namespace: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(body) for body in self.peek(spec, namespace)]

    def peek(self, spec: ResourceSpec, namespace: str | None = None) -> list[dict[str, Any]]:
        """The stored objects themselves (not copies): read them, never change them."""
        wanted = spec.key
        return [obj.raw for (resource, ns, _), obj in list(self.objects.items())
                if resource is wanted or resource == wanted
                if not obj.deleted and (namespace is None or ns == namespace)]

    # -- request handling -----------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        await raw_request.read()
        self.calls.append(Call(
            method=raw_request.method,
            path=raw_request.path,
            query=dict(raw_request.query),
            user_agent=raw_request.headers.get("User-Agent", ""),
            content_type=raw_request.headers.get("Content-Type", ""),
        ))
        for fault in list(self.faults):
            response = await fault(raw_request)
            if response is not None:
                return response
        match = NAMESPACES_PATH.match(raw_request.path)
        if match and raw_request.method == "GET" and raw_request.query.get("watch") not in ("true", "True", "1"):
            return self._namespaces(match.group("name"))
        return await super().__call__(raw_request)

    def _namespaces(self, name: str | None) -> aiohttp.web.StreamResponse:
        def item(ns: str) -> dict[str, Any]:
            return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "uid": f"ns-{ns}"},
                    "status": {"phase": "Active"}}

        if name is None:
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "NamespaceList",
                "metadata": {"resourceVersion": str(self.revision)},
                "items": [item(ns) for ns in sorted(self.namespaces)],
            })
        if name not in self.namespaces:
            return _status_response(404, "NotFound", f'namespaces "{name}" not found')
        return aiohttp.web.json_response(item(name))

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.subresource not in (None, "status"):
            return await super()._handle(request)
        watching = request.method == enums.method.GET and request.params.get("watch") in ("true", "True", "1")
        if watching:
            if request.action != enums.action.WATCH:
                request = attrs.evolve(request, action=enums.action.WATCH)
            return await super()._handle(request)
        if kmock.resource(request.resource) not in self.specs:
            return await super()._handle(request)
        try:
            if request.action == enums.action.CREATE:
                return await self._create(request)
            if request.action == enums.action.FETCH:
                return await self._fetch(request)
            if request.action == enums.action.LIST:
                return self._list(request)
            if request.action == enums.action.UPDATE:
                return await self._patch(request)
            if request.action == enums.action.DELETE:
                return await self._delete(request)
        except _ApiStatus as error:
            return _status_response(error.code, error.reason, error.message)
        return await super()._handle(request)

    def _key(self, spec: ResourceSpec, namespace: str | None, name: str) -> tuple[kmock.resource, str | None, str]:
        return (spec.key, namespace if spec.namespaced else None, name)

    def _next_version(self) -> str:
        self.revision += 1
        return str(self.revision)

    async def _create(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        spec = self.spec_of(request.resource)
        body = copy.deepcopy(request.data) if isinstance(request.data, dict) else None
        if body is None:
            raise _ApiStatus(400, "BadRequest", "the body must be a JSON object")
        meta = body.setdefault("metadata", {})
        namespace = request.namespace or meta.get("namespace")
        if spec.namespaced:
            if not namespace:
                raise _ApiStatus(400, "BadRequest", "a namespace is required")
            meta["namespace"] = namespace
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if not name:
            raise _ApiStatus(422, "Invalid", "metadata.name or metadata.generateName is required")
        async with self._lock:
            key = self._key(spec, namespace, name)
            if key in self.objects and not self.objects[key].deleted:
                raise _ApiStatus(409, "AlreadyExists", f'{spec.plural}.{spec.group} "{name}" already exists')
            body.setdefault("apiVersion", spec.api_version)
            body.setdefault("kind", spec.kind)
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = self._next_version()
            meta["generation"] = 1
            meta["creationTimestamp"] = now_rfc3339()
            meta.pop("deletionTimestamp", None)
            if spec.status_subresource:
                body.pop("status", None)
            if key in self.objects:
                self.objects[key].create(body)
            else:
                self.objects[key] = body
            await self._buses[spec.key].put({"type": "ADDED", "object": copy.deepcopy(body)})
        for hook in list(self.after_create):
            await hook(spec, copy.deepcopy(body))
        return aiohttp.web.json_response(body, status=201)

    async def _fetch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        spec = self.spec_of(request.resource)
        body = self.get(spec, request.namespace, request.name)
        if body is None:
            raise _ApiStatus(404, "NotFound", f'{spec.plural}.{spec.group} "{request.name}" not found')
        return aiohttp.web.json_response(body)

    def _list(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        spec = self.spec_of(request.resource)
        requirements = parse_selector(request.params.get("labelSelector", ""))
        items = []
        for stored in self.peek(spec, request.namespace):
            if matches_selector((stored.get("metadata") or {}).get("labels") or {}, requirements):
                body = copy.deepcopy(stored)
                body.setdefault("apiVersion", spec.api_version)
                body.setdefault("kind", spec.kind)
                items.append(body)
        return aiohttp.web.json_response({
            "apiVersion": spec.api_version,
            "kind": f"{spec.kind}List",
            "metadata": {"resourceVersion": str(self.revision)},
            "items": items,
        })

    async def _patch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        spec = self.spec_of(request.resource)
        content_type = request.headers.get("Content-Type", "")
        async with self._lock:
            key = self._key(spec, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                raise _ApiStatus(404, "NotFound", f'{spec.plural}.{spec.group} "{request.name}" not found')
            current = copy.deepcopy(self.objects[key].raw)
            patch = request.data
            if "json-patch" in content_type or isinstance(patch, list):
                try:
                    patched = jsonpatch.apply_patch(current, patch, in_place=False)
                except jsonpatch.JsonPatchTestFailed as error:
                    raise _ApiStatus(422, "Invalid", f"the test operation failed: {error}") from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                    raise _ApiStatus(422, "Invalid", str(error)) from None
            else:
                wanted = ((patch or {}).get("metadata") or {}).get("resourceVersion")
                if wanted is not None and wanted != current["metadata"].get("resourceVersion"):
                    raise _ApiStatus(409, "Conflict", f'Operation cannot be fulfilled on {spec.plural}.{spec.group} '
                                                      f'"{request.name}": the object has been modified; please apply '
                                                      f'your changes to the latest version and try again')
                patched = merge_patch(current, patch or {})
            result = self._apply_subresource(spec, request.subresource, current, patched)
            if result == current:
                return aiohttp.web.json_response(current)
            result["metadata"]["resourceVersion"] = self._next_version()
            meta = result["metadata"]
            self.objects[key].history.append(result)
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                await self._remove(key, spec)
            else:
                await self._buses[spec.key].put({"type": "MODIFIED", "object": copy.deepcopy(result)})
        return aiohttp.web.json_response(result)

    def _apply_subresource(self, spec: ResourceSpec, subresource: str | None, current: dict[str, Any],
                           patched: dict[str, Any]) -> dict[str, Any]:
        """What a PATCH may change: only status via /status, everything but status otherwise."""
        if subresource == "status":
            result = copy.deepcopy(current)
            if "status" in patched:
                result["status"] = patched["status"]
            else:
                result.pop("status", None)
            return result
        result = copy.deepcopy(patched)
        if spec.status_subresource:
            if "status" in current:
                result["status"] = copy.deepcopy(current["status"])
            else:
                result.pop("status", None)
        meta, old_meta = result.setdefault("metadata", {}), current.get("metadata", {})
        for immutable in ("uid", "creationTimestamp", "namespace", "name", "generation", "deletionTimestamp"):
            if immutable in old_meta:
                meta[immutable] = old_meta[immutable]
            else:
                meta.pop(immutable, None)
        if result.get("spec") != current.get("spec"):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        return result

    async def _delete(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        spec = self.spec_of(request.resource)
        async with self._lock:
            key = self._key(spec, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                raise _ApiStatus(404, "NotFound", f'{spec.plural}.{spec.group} "{request.name}" not found')
            body = await self._delete_locked(key, spec)
        return aiohttp.web.json_response(body)

    async def _delete_locked(self, key: Any, spec: ResourceSpec) -> dict[str, Any]:
        current = copy.deepcopy(self.objects[key].raw)
        meta = current["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = now_rfc3339()
                meta["resourceVersion"] = self._next_version()
                self.objects[key].history.append(current)
                await self._buses[spec.key].put({"type": "MODIFIED", "object": copy.deepcopy(current)})
            return current
        await self._remove(key, spec)
        return current

    async def _remove(self, key: Any, spec: ResourceSpec) -> None:
        """Remove the object, then garbage-collect what it owned (background propagation)."""
        body = copy.deepcopy(self.objects[key].raw)
        body["metadata"]["resourceVersion"] = self._next_version()
        self.objects[key].delete()
        await self._buses[spec.key].put({"type": "DELETED", "object": body})
        uid = body["metadata"].get("uid")
        for (resource, namespace, name), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            owners = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
            if any(owner.get("uid") == uid for owner in owners):
                dependent = self.specs.get(resource)
                if dependent is not None:
                    await self._delete_locked((resource, namespace, name), dependent)

    # -- helpers for the tests ------------------------------------------------------------

    async def create(self, spec: ResourceSpec, body: dict[str, Any]) -> dict[str, Any]:
        """Create an object as a client would (same path as POST)."""
        request = rendering.Request(action=enums.action.CREATE, resource=spec.key,
                                    namespace=(body.get("metadata") or {}).get("namespace"), data=body)
        response = await self._create(request)
        return json.loads(response.body)

    async def patch(self, spec: ResourceSpec, namespace: str | None, name: str, patch: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        request = rendering.Request(action=enums.action.UPDATE, resource=spec.key, namespace=namespace, name=name,
                                    subresource=subresource, data=patch,
                                    headers={"Content-Type": "application/merge-patch+json"})
        response = await self._patch(request)
        return json.loads(response.body)

    async def delete(self, spec: ResourceSpec, namespace: str | None, name: str) -> None:
        request = rendering.Request(action=enums.action.DELETE, resource=spec.key, namespace=namespace, name=name)
        await self._delete(request)


class _ApiStatus(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def _status_response(code: int, reason: str, message: str) -> aiohttp.web.StreamResponse:
    return aiohttp.web.json_response({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }, status=code)
