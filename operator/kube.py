"""The Kubernetes calls the reconciler makes, with the official `kubernetes` client.

kopf watches and caches; this module writes: RayJobs (list by label, create, delete), our
resources' status and finalizers, Events, and reads the peering object. Every call runs in the
controller's thread pool so the event loop never blocks.

Errors are `ApiError` with the HTTP status; 404 and 409 have their own subclasses because the
reconciler treats them as facts (gone, already exists / stale version), not as failures.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

from tokenmill import __version__
from tokenmill.api.resources import GROUP, KINDS, VERSION
from tokenmill.operator import rayjob

T = TypeVar("T")
USER_AGENT = f"tokenmill-operator/{__version__}"
FIELD_MANAGER = "tokenmill-operator"


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str = ""):
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason


class NotFound(ApiError):
    """The object does not exist (HTTP 404)."""


class Conflict(ApiError):
    """The write was based on a stale resourceVersion or the object exists (HTTP 409)."""


def load_configuration(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """The client configuration: in-cluster service account, else $KUBECONFIG or ~/.kube/config.

    KUBECONFIG is read now (the client library reads it once, when it is first imported).
    """
    import os

    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
    return configuration


def connection_info(configuration: Any, *, trust_env: bool = False) -> Any:
    """kopf's credentials from the same client configuration the operator's own calls use."""
    import kopf

    header = (configuration.get_api_key_with_prefix("BearerToken")
              or configuration.get_api_key_with_prefix("authorization"))
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        trust_env=trust_env,
    )


class Kube:
    def __init__(self, configuration: Any, executor: Executor, *, pool_size: int = 16):
        from kubernetes import client

        configuration.connection_pool_maxsize = max(pool_size, 4)
        self._api_client = client.ApiClient(configuration)
        self._api_client.user_agent = USER_AGENT
        self._custom = client.CustomObjectsApi(self._api_client)
        self._core = client.CoreV1Api(self._api_client)
        self._executor = executor

    def close(self) -> None:
        self._api_client.close()

    async def _call(self, fn: Callable[[], T]) -> T:
        from kubernetes.client.exceptions import ApiException

        loop = asyncio.get_running_loop()

        def run() -> T:
            try:
                return fn()
            except ApiException as error:
                raise _translate(error) from None

        return await loop.run_in_executor(self._executor, run)

    # -- RayJobs -------------------------------------------------------------------------

    async def list_rayjobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        result = await self._call(lambda: self._custom.list_namespaced_custom_object(
            rayjob.RAY_GROUP, rayjob.RAY_VERSION, namespace, rayjob.RAY_PLURAL, label_selector=selector))
        return list(result.get("items") or [])

    async def create_rayjob(self, namespace: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
        return await self._call(lambda: self._custom.create_namespaced_custom_object(
            rayjob.RAY_GROUP, rayjob.RAY_VERSION, namespace, rayjob.RAY_PLURAL, dict(manifest),
            field_manager=FIELD_MANAGER))

    async def delete_rayjob(self, namespace: str, name: str) -> None:
        """Foreground deletion: the RayJob stays (being deleted) until its RayCluster and pods are
        gone, so the reconciler waiting for it to vanish knows the attempt can no longer write."""
        from kubernetes import client

        await self._call(lambda: self._custom.delete_namespaced_custom_object(
            rayjob.RAY_GROUP, rayjob.RAY_VERSION, namespace, rayjob.RAY_PLURAL, name,
            body=client.V1DeleteOptions(propagation_policy="Foreground")))

    async def list_all_rayjobs(self, namespace: str | None, selector: str) -> list[dict[str, Any]]:
        if namespace is None:
            result = await self._call(lambda: self._custom.list_cluster_custom_object(
                rayjob.RAY_GROUP, rayjob.RAY_VERSION, rayjob.RAY_PLURAL, label_selector=selector))
        else:
            result = await self._call(lambda: self._custom.list_namespaced_custom_object(
                rayjob.RAY_GROUP, rayjob.RAY_VERSION, namespace, rayjob.RAY_PLURAL, label_selector=selector))
        return list(result.get("items") or [])

    # -- our resources -------------------------------------------------------------------

    async def list_resources(self, kind: str, namespace: str | None) -> list[dict[str, Any]]:
        plural = KINDS[kind].plural
        if namespace is None:
            result = await self._call(lambda: self._custom.list_cluster_custom_object(GROUP, VERSION, plural))
        else:
            result = await self._call(lambda: self._custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural))
        items = list(result.get("items") or [])
        for item in items:  # list items carry no kind of their own
            item.setdefault("apiVersion", f"{GROUP}/{VERSION}")
            item.setdefault("kind", kind)
        return items

    async def get_resource(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return await self._call(lambda: self._custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, KINDS[kind].plural, name))

    async def patch_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any],
                           resource_version: str | None) -> dict[str, Any]:
        """Merge-patch status; with resource_version, a stale view fails with Conflict."""
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._call(lambda: self._custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, KINDS[kind].plural, name, body, field_manager=FIELD_MANAGER))

    async def patch_finalizers(self, kind: str, namespace: str, name: str, finalizers: list[str],
                               resource_version: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"metadata": {"finalizers": finalizers}}
        if resource_version:
            body["metadata"]["resourceVersion"] = resource_version
        return await self._call(lambda: self._custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, KINDS[kind].plural, name, body, field_manager=FIELD_MANAGER))

    # -- events and peering --------------------------------------------------------------

    async def create_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        await self._call(lambda: self._core.create_namespaced_event(namespace, dict(body)))

    async def get_peering(self, name: str, namespace: str | None) -> dict[str, Any]:
        if namespace is None:
            return await self._call(lambda: self._custom.get_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", name))
        return await self._call(lambda: self._custom.get_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", name))

    async def served_resources(self, group: str, version: str) -> set[str]:
        """The resources the API server serves in group/version (API discovery; needs no RBAC).
        Empty when the group/version is not served."""
        def discover() -> set[str]:
            data = self._api_client.call_api(
                f"/apis/{group}/{version}", "GET", response_types_map={200: "object"}, auth_settings=["BearerToken"],
                _return_http_data_only=True)
            return {str(item.get("name")) for item in (data or {}).get("resources") or []}

        try:
            return await self._call(discover)
        except NotFound:
            return set()


def _translate(error: Any) -> ApiError:
    status = int(getattr(error, "status", 0) or 0)
    reason = str(getattr(error, "reason", "") or "")
    message = ""
    try:
        message = str(json.loads(error.body).get("message", ""))
    except (TypeError, ValueError, AttributeError):
        message = ""
    cls = NotFound if status == 404 else Conflict if status == 409 else ApiError
    return cls(status, reason, message[:500])
