"""The kopf handlers: thin, level-based, idempotent.

Every watch event of the four kinds and of the operator's RayJobs (the initial listing at
start-up, creations, updates, resumption after a restart or a peering pause, deletions) lands
in one place: the controller's cache and work queue, from which one `reconcile` per resource
recomputes the desired state. No handler carries state of its own, so a restart at any
point loses nothing.

kopf's create/update/resume/delete handlers and timers are deliberately not used: they make
kopf store per-handler progress in annotations and put a finalizer on every resource (timers
always need one), which would block deleting resources while the operator is down. The
operator's own resync replaces timers, and its only finalizer is the one deletePolicy Delete
needs.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from tokenmill.api.resources import GROUP, KINDS, VERSION
from tokenmill.operator import naming, rayjob
from tokenmill.operator.config import OperatorConfig, from_env

log = logging.getLogger("tokenmill.operator")
MEMO_CONFIG = "tokenmill_config"
MEMO_CONTROLLER = "tokenmill_controller"
MEMO_KUBE = "tokenmill_kube_configuration"
_REGISTERED: set[int] = set()


def register(registry: kopf.OperatorRegistry) -> kopf.OperatorRegistry:
    """Add the operator's handlers to `registry` (once per registry)."""
    if id(registry) in _REGISTERED:
        return registry
    _REGISTERED.add(id(registry))
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.probe(id="reconciler", registry=registry)(probe)
    for info in KINDS.values():
        kopf.on.event(GROUP, VERSION, info.plural, id=f"watch-{info.plural}", registry=registry)(resource_event)
    kopf.on.event(
        rayjob.RAY_GROUP, rayjob.RAY_VERSION, rayjob.RAY_PLURAL, id="watch-rayjobs",
        labels={naming.LABEL_MANAGED_BY: naming.MANAGED_BY}, registry=registry,
    )(rayjob_event)
    return registry


def login(settings: kopf.OperatorSettings, **_: Any) -> Any:
    """In-cluster service account, else $KUBECONFIG: the same credentials the reconciler uses."""
    from tokenmill.operator.kube import connection_info, load_configuration

    try:
        configuration = load_configuration()
    except Exception as error:  # kubernetes.config.ConfigException, unreadable files
        raise kopf.LoginError(f"cannot authenticate in-cluster or with a kubeconfig: {error}") from None
    return connection_info(configuration, trust_env=settings.networking.trust_env)


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    from tokenmill.operator.controller import Controller, PeeringSettings
    from tokenmill.operator.kube import Kube, load_configuration
    from tokenmill.operator.metrics import HealthServer

    config: OperatorConfig = memo.get(MEMO_CONFIG) or from_env()
    # Least privilege: no cluster-wide watching of CRDs and namespaces. The resources are
    # discovered once at start-up (API discovery needs no RBAC); a missing KubeRay is an error.
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    peering = PeeringSettings(
        standalone=bool(settings.peering.standalone),
        name=settings.peering.name,
        priority=int(settings.peering.priority),
        clusterwide=config.clusterwide,
        namespaces=config.namespaces,
    )
    configuration = memo.get(MEMO_KUBE) or load_configuration()
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(max_workers=config.api_threads, thread_name_prefix="tokenmill-io")
    kube = Kube(configuration, executor, pool_size=config.api_threads)
    served = await kube.served_resources(rayjob.RAY_GROUP, rayjob.RAY_VERSION)
    if rayjob.RAY_PLURAL not in served:
        kube.close()
        raise kopf.PermanentError(
            f"the API server does not serve {rayjob.RAY_API_VERSION} RayJobs: install KubeRay (>= 1.1) first"
        )
    controller = Controller(config, kube, peering=peering, executor=executor)
    await controller.start()
    server = HealthServer(controller.metrics, lambda: controller.ready, port=config.metrics_port)
    port = await server.start()
    controller.health_server = server
    memo[MEMO_CONTROLLER] = controller
    log.info("tokenmill operator started: metrics on :%d/metrics, %s, %s", port,
             "all namespaces" if config.clusterwide else f"namespaces {', '.join(config.namespaces)}",
             "standalone" if peering.standalone else f"peering {peering.name!r} priority {peering.priority}")


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    controller = memo.get(MEMO_CONTROLLER)
    if controller is None:
        return
    if controller.health_server is not None:
        await controller.health_server.stop()
    await controller.stop()
    controller.kube.close()


async def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Reported on kopf's liveness endpoint."""
    controller = memo.get(MEMO_CONTROLLER)
    if controller is None:
        return {"started": False}
    return {"started": controller.started, "active": controller.active,
            "queued": len(controller.queue) if controller.queue is not None else 0}


async def resource_event(event: dict[str, Any], memo: kopf.Memo, resource: kopf.Resource, **_: Any) -> None:
    controller = memo.get(MEMO_CONTROLLER)
    body = event.get("object")
    if controller is None or not isinstance(body, dict):
        return
    kind = body.get("kind") or resource.kind
    if kind in KINDS:
        controller.resource_event(kind, event.get("type"), body)


async def rayjob_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    controller = memo.get(MEMO_CONTROLLER)
    body = event.get("object")
    if controller is None or not isinstance(body, dict):
        return
    controller.rayjob_event(event.get("type"), body)
