"""The operator's cluster-wide defaults, read from environment variables.

A recipe stays short because everything about the cluster lives here: the Ray image, the
GPU node pool, the object store. Every setting has an environment variable (set by the Helm
chart) and most have a command-line flag on `tokenmill operator` that overrides it.

| variable                         | meaning                                                   | default |
| -------------------------------- | --------------------------------------------------------- | ------- |
| TOKENMILL_RAY_IMAGE              | Ray worker image when spec.ray.image is omitted           | ghcr.io/tokenmill/ray-worker:<version> |
| TOKENMILL_RAY_VERSION            | rayVersion written into each RayCluster spec              | 2.60.0 |
| TOKENMILL_RAY_SERVICE_ACCOUNT    | service account of the Ray pods (IRSA / workload identity) | none |
| TOKENMILL_RAY_ENV                | extra non-secret environment for Ray pods, JSON object     | {} |
| TOKENMILL_GPU_NODE_SELECTOR      | node selector of the GPU pool, JSON object or k=v,k=v      | {"nvidia.com/gpu.present": "true"} |
| TOKENMILL_GPU_TOLERATIONS        | tolerations of the GPU pool, JSON list                     | nvidia.com/gpu Exists NoSchedule |
| TOKENMILL_CPU_NODE_SELECTOR      | node selector of the CPU pool (kinds needing no GPUs)      | {} |
| TOKENMILL_CPU_TOLERATIONS        | tolerations of the CPU pool, JSON list                     | [] |
| TOKENMILL_RAY_POD                | additions to every Ray pod, JSON as spec.ray.pod (RDMA resources, NCCL env, volumes, priority class, Kueue topology); spec.ray.pod adds to it | {} |
| TOKENMILL_STORE                  | default output store; outputs go to <store>/<ns>/<plural>/<name> | none (spec.output.uri required) |
| TOKENMILL_CREDENTIALS_SECRET     | Secret with store credentials when spec.output.credentialsSecret is omitted | none |
| TOKENMILL_QUEUE                  | Kueue LocalQueue of a RayJob when spec.ray.queueName is omitted | none (not queued) |
| TOKENMILL_NAMESPACES             | comma-separated namespaces to serve; empty serves all      | all |
| TOKENMILL_RESYNC_SECONDS         | every resource is reconciled at least this often           | 60 |
| TOKENMILL_RETRY_BACKOFF_SECONDS  | delay before the first retry; doubles per failure, capped at 10 min | 10 |
| TOKENMILL_WORKERS                | resources reconciled concurrently                          | 8 |
| TOKENMILL_API_THREADS            | threads for Kubernetes and object-store calls             | 16 |
| TOKENMILL_METRICS_PORT           | port of /metrics, /healthz and /readyz (0 picks a free port) | 8080 |
| TOKENMILL_PEERING                | kopf peering name (two replicas, one active)               | tokenmill |
| TOKENMILL_STANDALONE             | true: no peering (a single replica)                        | false |
| TOKENMILL_PEERING_PRIORITY       | this replica's peering priority; empty picks a random one  | random |

The operator reads and writes the object store with its own credentials (the environment or
TOKENMILL_S3_CREDENTIALS_DIR, see tokenmill.store.credentials); it never reads Secrets.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tokenmill import __version__
from tokenmill.api.fields import LABEL_VALUE
from tokenmill.api.placement import PodExtras

DEFAULT_IMAGE = f"ghcr.io/tokenmill/ray-worker:{__version__}"
DEFAULT_RAY_VERSION = "2.60.0"
DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)


class ConfigError(ValueError):
    """A malformed operator setting; the message names the variable."""


@dataclass(frozen=True)
class OperatorConfig:
    image: str = DEFAULT_IMAGE
    ray_version: str = DEFAULT_RAY_VERSION
    service_account: str | None = None
    ray_env: Mapping[str, str] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_NODE_SELECTOR))
    tolerations: tuple[Mapping[str, Any], ...] = DEFAULT_TOLERATIONS
    cpu_node_selector: Mapping[str, str] = field(default_factory=dict)
    cpu_tolerations: tuple[Mapping[str, Any], ...] = ()
    pod_extras: PodExtras = field(default_factory=PodExtras)
    store: str | None = None
    credentials_secret: str | None = None
    queue_name: str | None = None
    namespaces: tuple[str, ...] = ()
    resync_seconds: float = 60.0
    retry_backoff_seconds: float = 10.0
    retry_backoff_max_seconds: float = 600.0
    error_backoff_seconds: float = 1.0
    error_backoff_max_seconds: float = 300.0
    workers: int = 8
    api_threads: int = 16
    metrics_port: int = 8080
    peering: str = "tokenmill"
    standalone: bool = False
    peering_priority: int | None = None
    peering_check_seconds: float = 5.0

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def with_overrides(self, **changes: Any) -> OperatorConfig:
        """A copy with the given fields replaced; None values are ignored (flag not given)."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    def priority(self) -> int:
        """This replica's peering priority: configured, else random so two replicas never tie."""
        if self.peering_priority is not None:
            return self.peering_priority
        return 100 + secrets.randbelow(2**31 - 200)


def from_env(environ: Mapping[str, str] | None = None) -> OperatorConfig:
    """The configuration from TOKENMILL_* variables (see the module docstring)."""
    env = os.environ if environ is None else environ
    base = OperatorConfig()

    def text(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    def number(name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, not {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum:g}, not {raw!r}")
        return value

    priority = text("TOKENMILL_PEERING_PRIORITY")
    namespaces = tuple(ns.strip() for ns in (text("TOKENMILL_NAMESPACES") or "").split(",") if ns.strip())
    return OperatorConfig(
        image=text("TOKENMILL_RAY_IMAGE") or base.image,
        ray_version=text("TOKENMILL_RAY_VERSION") or base.ray_version,
        service_account=text("TOKENMILL_RAY_SERVICE_ACCOUNT"),
        ray_env=_string_map("TOKENMILL_RAY_ENV", text("TOKENMILL_RAY_ENV"), {}),
        node_selector=_string_map("TOKENMILL_GPU_NODE_SELECTOR", text("TOKENMILL_GPU_NODE_SELECTOR"),
                                  dict(DEFAULT_NODE_SELECTOR)),
        tolerations=_tolerations("TOKENMILL_GPU_TOLERATIONS", text("TOKENMILL_GPU_TOLERATIONS"), DEFAULT_TOLERATIONS),
        cpu_node_selector=_string_map("TOKENMILL_CPU_NODE_SELECTOR", text("TOKENMILL_CPU_NODE_SELECTOR"), {}),
        cpu_tolerations=_tolerations("TOKENMILL_CPU_TOLERATIONS", text("TOKENMILL_CPU_TOLERATIONS"), ()),
        pod_extras=_pod_extras(text("TOKENMILL_RAY_POD")),
        store=text("TOKENMILL_STORE"),
        credentials_secret=text("TOKENMILL_CREDENTIALS_SECRET"),
        queue_name=_queue_name(text("TOKENMILL_QUEUE")),
        namespaces=namespaces,
        resync_seconds=number("TOKENMILL_RESYNC_SECONDS", base.resync_seconds, minimum=0.1),
        retry_backoff_seconds=number("TOKENMILL_RETRY_BACKOFF_SECONDS", base.retry_backoff_seconds),
        workers=int(number("TOKENMILL_WORKERS", base.workers, minimum=1)),
        api_threads=int(number("TOKENMILL_API_THREADS", base.api_threads, minimum=1)),
        metrics_port=int(number("TOKENMILL_METRICS_PORT", base.metrics_port)),
        peering=text("TOKENMILL_PEERING") or base.peering,
        standalone=(text("TOKENMILL_STANDALONE") or "false").lower() in ("1", "true", "yes"),
        peering_priority=None if priority is None else int(number("TOKENMILL_PEERING_PRIORITY", 0)),
    )


def _string_map(name: str, raw: str | None, default: dict[str, str]) -> dict[str, str]:
    """A JSON object, or `k=v,k2=v2`; every value a string."""
    if raw is None:
        return default
    if raw.startswith("{"):
        try:
            value = json.loads(raw)
        except ValueError as error:
            raise ConfigError(f"{name} is not valid JSON: {error}") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{name} must be a JSON object of strings")
        return dict(value)
    out = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{name} must be a JSON object or key=value pairs separated by commas")
        out[key.strip()] = value.strip()
    return out


def _queue_name(raw: str | None) -> str | None:
    if raw is not None and (len(raw) > 63 or not re.fullmatch(LABEL_VALUE, raw)):
        raise ConfigError(f"TOKENMILL_QUEUE must be a Kueue LocalQueue name (a label value of at most 63 "
                          f"characters: letters, digits, '-', '_', '.', alphanumeric at both ends), not {raw!r}")
    return raw


def _pod_extras(raw: str | None) -> PodExtras:
    if raw is None:
        return PodExtras()
    try:
        return PodExtras.model_validate_json(raw)
    except ValueError as error:
        raise ConfigError(f"TOKENMILL_RAY_POD is not a valid pod addition (as spec.ray.pod): {error}") from None


def _tolerations(name: str, raw: str | None,
                 default: tuple[Mapping[str, Any], ...]) -> tuple[Mapping[str, Any], ...]:
    if raw is None:
        return default
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise ConfigError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"{name} must be a JSON list of toleration objects")
    return tuple(value)
