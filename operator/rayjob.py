"""The RayJob manifest for one attempt of one resource (pure: no I/O).

The entrypoint is built from fixed tokens only: `python -m tokenmill.trainer`, the kind's
sub-command and `--spec` followed by the run spec's URI, each shell-quoted. The URI is the
operator's own (derived from spec.output.uri, which the schema restricts to s3:// and file://
URIs without white space); nothing else a user writes reaches the command line.

Placement: spec.ray (image, head and worker sizes, node selector, tolerations) over the
operator's defaults (image, GPU node pool selector and tolerations; a kind whose descriptor
says this spec needs no GPUs, such as a CorpusFilter or a SyntheticDataJob on the `openai`
engine, gets the CPU pool's instead). Deadlines map onto
KubeRay's fields: activeDeadlineSeconds (reason DeadlineExceeded) and
preRunningDeadlineSeconds (KubeRay >= 1.6; reason PreRunningDeadlineExceeded), so an attempt
stuck initializing (image pull, no GPUs) fails instead of hanging. KubeRay's own retries
(spec.backoffLimit) stay at 0: the operator retries with a new RayJob per attempt.

Pods run restricted: non-root (the Ray image's user), no privilege escalation, every
capability dropped, seccomp RuntimeDefault, no service-account token (Ray needs no Kubernetes
API without the autoscaler), and /dev/shm never larger than the container's memory limit
(an in-memory emptyDir counts against it). The store Secret reaches the pods key by key
(`secretKeyRef`), never as a whole (`envFrom`).
"""

from __future__ import annotations

import copy
import re
import shlex
from typing import Any

from tokenmill.api.common import SecretKeyRef
from tokenmill.api.placement import KUEUE_PREFERRED_TOPOLOGY, KUEUE_REQUIRED_TOPOLOGY, PodExtras
from tokenmill.api.resources import API_VERSION, KINDS, AnyResource
from tokenmill.operator import naming
from tokenmill.operator.config import OperatorConfig
from tokenmill.workloads import METRICS_PORT, METRICS_PORT_ENV, METRICS_PORT_NAME

RAY_API_VERSION = "ray.io/v1"
RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayjobs"
WORKER_GROUP = "workers"
SHM_VOLUME = "dshm"
GPU_RESOURCE = "nvidia.com/gpu"
TRAINER_MODULE = "tokenmill.trainer"
# The keys of the store credentials Secret a workload reads (tokenmill.store.credentials);
# only the first two must be present.
STORE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_STORE_SECRET_KEYS = ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION")
# rayproject/ray images (the base of the worker image) run as user `ray` (1000) in group `users` (100).
RAY_UID, RAY_GID = 1000, 100
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False, "privileged": False, "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([a-zA-Z]*|[eE][+-]?[0-9]+)$")
_SUFFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_value(text: str) -> float:
    """A Kubernetes quantity as a number (bytes for memory): `16Gi` -> 17179869184."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, suffix = float(match.group(1)), match.group(2)
    if suffix[:1] in ("e", "E") and suffix[1:].lstrip("+-").isdigit():
        return number * 10 ** int(suffix[1:])
    if suffix not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    return number * _SUFFIX[suffix]


def store_secret_env(secret: str) -> list[dict[str, Any]]:
    """The store credentials, key by key from `secret` (optional keys may be absent)."""
    env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in STORE_SECRET_KEYS]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for key in OPTIONAL_STORE_SECRET_KEYS]
    return env


def apply_pod_extras(template: dict[str, Any], extras: PodExtras, *, workers: bool) -> None:
    """Merge `extras` into a group's pod template (in place), as a strategic merge would: maps
    by key, env by name, volumes by name, each container mounting every volume. Device
    resources and the topology request apply to the worker group only. Refuses to replace
    anything the template already has (the model already keeps tokenmill's names reserved)."""
    meta = template.setdefault("metadata", {})
    annotations = dict(extras.annotations)
    if workers and extras.topology is not None:
        if extras.topology.required:
            annotations[KUEUE_REQUIRED_TOPOLOGY] = extras.topology.required
        else:
            annotations[KUEUE_PREFERRED_TOPOLOGY] = str(extras.topology.preferred)
    if annotations:
        meta["annotations"] = {**meta.get("annotations", {}), **annotations}
    pod = template["spec"]
    if extras.priority_class_name:
        pod["priorityClassName"] = extras.priority_class_name
    existing_volumes = {volume["name"] for volume in pod.get("volumes", [])}
    for volume in extras.volumes:
        if volume.name in existing_volumes:
            raise ValueError(f"pod volume {volume.name} already exists")
        source = volume.to_wire()
        source.pop("mountPath")
        pod.setdefault("volumes", []).append(source)
    for container in pod["containers"]:
        names = {item["name"] for item in container.get("env", [])}
        for item in extras.env:
            if item.name in names:
                raise ValueError(f"environment variable {item.name} is already set on {container['name']}")
            container.setdefault("env", []).append({"name": item.name, "value": item.value})
        for volume in extras.volumes:
            mount = {"name": volume.name, "mountPath": volume.mount_path}
            if volume.persistent_volume_claim is not None and volume.persistent_volume_claim.read_only:
                mount["readOnly"] = True
            container.setdefault("volumeMounts", []).append(mount)
        if workers:
            for resource, amount in extras.extra_resources.items():
                container["resources"]["requests"][resource] = amount
                container["resources"]["limits"][resource] = amount


def shared_memory_size(shared_memory: str, memory_limit: str) -> str:
    """/dev/shm's size: the requested one, but never more than half the container's memory
    limit, which the in-memory emptyDir counts against."""
    limit = quantity_value(memory_limit)
    if quantity_value(shared_memory) <= limit / 2:
        return shared_memory
    return f"{int(limit // 2 // 2**20)}Mi"


def entrypoint(kind: str, spec_uri: str) -> str:
    """`python -m tokenmill.trainer <cli_name> --spec <uri>`, every token quoted."""
    if any(ch.isspace() for ch in spec_uri) or not spec_uri.startswith(("s3://", "file:///")):
        raise ValueError(f"the run spec URI must be an s3:// or file:/// URI without white space: {spec_uri!r}")
    return shlex.join(["python", "-m", TRAINER_MODULE, KINDS[kind].cli_name, "--spec", spec_uri])


def secret_key_env(resource: AnyResource) -> list[dict[str, Any]]:
    """The Secret keys the kind's workload reads (its descriptor's secret_key_env), as env entries
    the kubelet fills from the Secret: their values never appear in a spec or status."""
    descriptor = KINDS[resource.kind]
    env = []
    for reference in descriptor.references(resource.spec):
        name = descriptor.secret_key_env.get(reference.field)
        if name and isinstance(reference.secret, SecretKeyRef):
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": reference.secret.name,
                                                                     "key": reference.secret.key}}})
    return env


def labels(resource: AnyResource, attempt: int) -> dict[str, str]:
    return {
        naming.LABEL_KIND: resource.kind,
        naming.LABEL_NAME: naming.label_value(resource.name),
        naming.LABEL_ATTEMPT: str(attempt),
        naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
    }


def owner_reference(resource: AnyResource, *, preview: bool = False) -> dict[str, Any]:
    uid = resource.metadata.uid
    if not uid:
        if not preview:
            raise ValueError(f"{resource.kind}/{resource.name} has no metadata.uid; it must come from the API server")
        uid = "<set by the API server>"
    return {
        "apiVersion": API_VERSION,
        "kind": resource.kind,
        "name": resource.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def render(
    resource: AnyResource,
    *,
    namespace: str,
    attempt: int,
    spec_uri: str,
    config: OperatorConfig,
    preview: bool = False,
) -> dict[str, Any]:
    """The RayJob that runs attempt `attempt` of `resource` from the run spec at `spec_uri`.

    `preview` (for `tokenmill render`) accepts a resource that has no uid yet.
    """
    spec = resource.spec
    ray = spec.ray
    meta_labels = labels(resource, attempt)
    queue = ray.queue_name or config.queue_name
    if queue:
        meta_labels[naming.LABEL_QUEUE] = queue
    pod_labels = {key: meta_labels[key] for key in (naming.LABEL_KIND, naming.LABEL_NAME, naming.LABEL_ATTEMPT)}

    secret = spec.output.credentials_secret.name if spec.output.credentials_secret else config.credentials_secret
    env = [{"name": key, "value": value} for key, value in sorted(config.ray_env.items())]
    env.append({"name": "TOKENMILL_ATTEMPT", "value": str(attempt)})
    if secret:
        env += store_secret_env(secret)
    env += secret_key_env(resource)
    image = ray.image or config.image
    gpus = KINDS[resource.kind].needs_gpus(spec)
    default_selector = config.node_selector if gpus else config.cpu_node_selector
    default_tolerations = config.tolerations if gpus else config.cpu_tolerations
    node_selector = dict(ray.node_selector) if ray.node_selector is not None else dict(default_selector)
    if ray.tolerations is not None:
        tolerations = [toleration.to_wire() for toleration in ray.tolerations]
    else:
        tolerations = [dict(toleration) for toleration in default_tolerations]

    def pod_spec(container: dict[str, Any], volumes: list[dict[str, Any]]) -> dict[str, Any]:
        pod: dict[str, Any] = {"containers": [container], "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
                               "automountServiceAccountToken": False}
        if volumes:
            pod["volumes"] = volumes
        if node_selector:
            pod["nodeSelector"] = dict(node_selector)
        if tolerations:
            pod["tolerations"] = [dict(toleration) for toleration in tolerations]
        if config.service_account:
            pod["serviceAccountName"] = config.service_account
        return pod

    def container(name: str, resources: dict[str, str], mounts: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": name,
            "image": image,
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            "env": [copy.deepcopy(item) for item in env],
            "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
        }
        if mounts:
            out["volumeMounts"] = mounts
        return out

    head = container("ray-head", {"cpu": ray.head.cpus, "memory": ray.head.memory}, [])
    # The driver runs on the head; it serves the workload's metrics there for a PodMonitor.
    head["env"].append({"name": METRICS_PORT_ENV, "value": str(METRICS_PORT)})
    head["ports"] = [{"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"}]
    workers = ray.workers
    worker_resources = {"cpu": workers.cpus_per_worker, "memory": workers.memory_per_worker}
    if workers.gpus_per_worker:
        worker_resources[GPU_RESOURCE] = str(workers.gpus_per_worker)
    shm_size = shared_memory_size(workers.shared_memory, workers.memory_per_worker)
    shm_volume = {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}
    shm_mount = {"name": SHM_VOLUME, "mountPath": "/dev/shm"}

    rayjob_spec: dict[str, Any] = {
        "entrypoint": entrypoint(resource.kind, spec_uri),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": ray.ttl_seconds_after_finished,
        "preRunningDeadlineSeconds": ray.pre_running_deadline_seconds,
        "backoffLimit": 0,
        "rayClusterSpec": {
            "rayVersion": config.ray_version,
            "headGroupSpec": {
                # The head runs the driver only; Ray tasks and training workers go to the workers.
                "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                "template": {
                    "metadata": {"labels": dict(pod_labels)},
                    "spec": pod_spec(head, []),
                },
            },
            "workerGroupSpecs": [
                {
                    "groupName": WORKER_GROUP,
                    "replicas": workers.replicas,
                    "minReplicas": workers.replicas,
                    "maxReplicas": workers.replicas,
                    "rayStartParams": {},
                    "template": {
                        "metadata": {"labels": dict(pod_labels)},
                        "spec": pod_spec(container("ray-worker", worker_resources, [shm_mount]), [shm_volume]),
                    },
                }
            ],
        },
    }
    if ray.active_deadline_seconds is not None:
        rayjob_spec["activeDeadlineSeconds"] = ray.active_deadline_seconds
    extras = ray.pod.merged_over(config.pod_extras) if ray.pod is not None else config.pod_extras
    cluster = rayjob_spec["rayClusterSpec"]
    apply_pod_extras(cluster["headGroupSpec"]["template"], extras, workers=False)
    for group in cluster["workerGroupSpecs"]:
        apply_pod_extras(group["template"], extras, workers=True)

    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": {
            "name": naming.rayjob_name(resource.kind, resource.name, attempt),
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": {naming.ANNOTATION_SPEC_URI: spec_uri},
            "ownerReferences": [owner_reference(resource, preview=preview)],
        },
        "spec": rayjob_spec,
    }
