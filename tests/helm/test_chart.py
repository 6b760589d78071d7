"""charts/tokenmill rendered and linted by the Helm SDK, every manifest checked against its schema.

Kubernetes' own kinds are validated (strict: no unknown field) against the OpenAPI schemas of
the newest Kubernetes version kubernetes-validate ships; the prometheus-operator kinds against
the schema of prometheus-operator's CRDs (cloudcoil's generated models), made strict the same
way; kopf's peering objects against the chart's own peering CRDs.
"""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring
from kubernetes_validate import utils as kubernetes_schemas

from tests.conftest import REPO
from tests.helm.chart import CHART, NAMESPACE, crds, notes, only, render
from tokenmill.operator import config as operator_config
from tokenmill.operator.config import OperatorConfig, from_env

KUBERNETES_VERSION = kubernetes_schemas.latest_version()
NON_DEFAULT = {
    "watchNamespaces": ["research", "prod"],
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "podMonitor": {"enabled": True, "interval": "15s"},
    "image": {"repository": "registry.example.com/tokenmill/operator", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "defaults": {
        "rayImage": "registry.example.com/tokenmill/ray-worker:0.1.0-rc1",
        "store": "s3://models/tokenmill",
        "credentialsSecret": "store-credentials",
        "queueName": "h100-research",
        "rayServiceAccount": "ray-workloads",
        "rayEnv": {"HF_HUB_OFFLINE": "1"},
        # Helm merges maps with the defaults: null removes a default key.
        "gpuNodeSelector": {"cloud.example.com/pool": "h100", "nvidia.com/gpu.present": None},
        "gpuTolerations": [{"key": "dedicated", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}],
        "cpuNodeSelector": {"cloud.example.com/pool": "cpu"},
        "cpuTolerations": [{"key": "spot", "operator": "Exists"}],
        "rayPod": {"priorityClassName": "training", "extraResources": {"rdma/ib": "1"},
                   "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}]},
    },
    "storeCredentialsSecret": "operator-store",
    "grafanaDashboard": {"namespace": "monitoring"},
    "logging": {"verbose": True},
}


def _strict(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others."""
    if isinstance(schema, dict):
        closed = {key: _strict(value) for key, value in schema.items()}
        if "properties" in closed and "additionalProperties" not in closed:
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _custom_resource_schema(crd_text: str) -> dict[str, Any]:
    crd = yaml.safe_load(crd_text)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


MONITORING_SCHEMAS = {
    "ServiceMonitor": _strict(monitoring.ServiceMonitor.model_json_schema(by_alias=True)),
    "PodMonitor": _strict(monitoring.PodMonitor.model_json_schema(by_alias=True)),
}


def validate(item: dict[str, Any]) -> None:
    """Raise if the object does not match its kind's schema."""
    kind = item["kind"]
    if kind in MONITORING_SCHEMAS:
        jsonschema.validate(item, MONITORING_SCHEMAS[kind])
    elif item["apiVersion"] == "kopf.dev/v1":
        plural = {"ClusterKopfPeering": "clusterkopfpeerings", "KopfPeering": "kopfpeerings"}[kind]
        schema = _custom_resource_schema(crds()[f"{plural}.kopf.dev.yaml"])
        jsonschema.validate({key: value for key, value in item.items() if key not in ("apiVersion", "kind", "metadata")},
                            schema)
        assert item["metadata"]["name"]
    else:
        kubernetes_schemas.validate(item, KUBERNETES_VERSION, strict=True)


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {entry["name"]: entry["value"] for entry in container["env"] if "value" in entry}


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def custom_objects() -> list[dict[str, Any]]:
    return render(NON_DEFAULT)


def test_the_chart_lints_clean() -> None:
    for values in ({}, NON_DEFAULT):
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES_VERSION}.0")
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


@pytest.mark.parametrize("objects", ["default_objects", "custom_objects"])
def test_every_rendered_manifest_matches_its_schema(objects: str, request: pytest.FixtureRequest) -> None:
    rendered = request.getfixturevalue(objects)
    assert rendered
    for item in rendered:
        validate(item)


def test_the_schemas_catch_what_they_should() -> None:
    """The validation above can fail: a wrong field in each kind of object is caught."""
    deployment, = only(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = ["Always"]
    with pytest.raises(kubernetes_schemas.ValidationError):
        validate(deployment)
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_schemas.ValidationError):
        validate(deployment)
    monitor, = only(render(NON_DEFAULT), "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["prot"] = "tm-metrics"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    peering, = only(render(), "ClusterKopfPeering")
    peering["status"] = "not an object"
    with pytest.raises(jsonschema.ValidationError):
        validate(peering)


@pytest.mark.parametrize("values, where", [
    ({"serviceMonitor": {"enabeld": True}}, "/serviceMonitor"),
    ({"replicas": 2}, ""),
    ({"defaults": {"gpuNodeSelectors": {}}}, "/defaults"),
    ({"defaults": {"rayPod": {"extraResource": {"rdma/ib": "1"}}}}, "/defaults/rayPod"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
])
def test_a_misspelled_or_wrong_value_is_rejected(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert f"at '{where}'" in str(caught.value)


def test_the_deployment_is_hardened_and_probed(default_objects) -> None:
    deployment, = only(default_objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container, = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http-metrics": 8080, "health": 8081}
    # kopf's liveness endpoint (with the reconciler's probe) and the operator's readiness.
    assert container["args"][:3] == ["operator", "--liveness", "http://0.0.0.0:8081/healthz"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert pod["serviceAccountName"] == "tokenmill"
    assert container["image"] == "ghcr.io/tokenmill/operator:0.1.0"


def test_the_defaults_configure_the_operator_as_its_own_defaults(default_objects) -> None:
    """The chart's default values give the operator exactly operator/config.py's defaults."""
    deployment, = only(default_objects, "Deployment")
    configured = from_env(env_of(deployment))
    assert configured == OperatorConfig(standalone=False, metrics_port=8080)


def test_non_default_values_reach_the_operator(custom_objects) -> None:
    deployment, = only(custom_objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/tokenmill/operator:0.1.0-rc1"
    assert "--verbose" in container["args"]
    config = from_env(env_of(deployment))
    assert config.image == "registry.example.com/tokenmill/ray-worker:0.1.0-rc1"
    assert config.store == "s3://models/tokenmill" and config.credentials_secret == "store-credentials"
    assert config.queue_name == "h100-research"
    assert config.namespaces == ("research", "prod") and not config.clusterwide
    assert config.node_selector == {"cloud.example.com/pool": "h100"}
    assert config.tolerations == ({"key": "dedicated", "operator": "Equal", "value": "h100", "effect": "NoSchedule"},)
    assert config.service_account == "ray-workloads" and config.ray_env == {"HF_HUB_OFFLINE": "1"}
    assert config.cpu_node_selector == {"cloud.example.com/pool": "cpu"}
    assert config.cpu_tolerations == ({"key": "spot", "operator": "Exists"},)
    assert config.pod_extras.priority_class_name == "training"
    assert config.pod_extras.extra_resources == {"rdma/ib": "1"}
    assert [(item.name, item.value) for item in config.pod_extras.env] == [("NCCL_IB_HCA", "mlx5")]
    # The operator's own store credentials: the Secret mounted as the credentials directory.
    mount, = [m for m in container["volumeMounts"] if m["name"] == "store-credentials"]
    assert env_of(deployment)["TOKENMILL_S3_CREDENTIALS_DIR"] == mount["mountPath"] and mount["readOnly"]
    volume, = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "store-credentials"]
    assert volume["secret"]["secretName"] == "operator-store"


def test_every_operator_setting_is_a_value(custom_objects) -> None:
    """Each TOKENMILL_* variable operator/config.py documents is set from the chart's values."""
    documented = set(re.findall(r"^\| (TOKENMILL_[A-Z_]+)", operator_config.__doc__ or "", re.M))
    assert documented, "operator/config.py's table of variables"
    deployment, = only(custom_objects, "Deployment")
    # Each replica picks a random priority, so that two replicas never tie.
    assert documented - set(env_of(deployment)) == {"TOKENMILL_PEERING_PRIORITY"}


def test_peering_and_rbac_are_namespaced_when_namespaces_are_named(default_objects, custom_objects) -> None:
    peering, = only(default_objects, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "tokenmill"
    assert [item["metadata"]["namespace"] for item in only(custom_objects, "KopfPeering")] == ["research", "prod"]
    assert not only(custom_objects, "ClusterKopfPeering")
    assert not only(custom_objects, "ClusterRole") and not only(custom_objects, "ClusterRoleBinding")
    roles, bindings = only(custom_objects, "Role"), only(custom_objects, "RoleBinding")
    assert [role["metadata"]["namespace"] for role in roles] == ["research", "prod"]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tokenmill", "namespace": NAMESPACE}]
    cluster_role, = only(default_objects, "ClusterRole")
    binding, = only(default_objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    # The namespaced Role grants what the ClusterRole does, with kopf's namespaced peering.
    for role in roles:
        expected = json.loads(json.dumps(cluster_role["rules"]).replace("clusterkopfpeerings", "kopfpeerings"))
        assert role["rules"] == expected


def test_one_replica_may_run_standalone_two_may_not(default_objects) -> None:
    budget, = only(default_objects, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    single = render({"replicaCount": 1, "peering": {"enabled": False}})
    assert not only(single, "PodDisruptionBudget")
    deployment, = only(single, "Deployment")
    assert env_of(deployment)["TOKENMILL_STANDALONE"] == "true"
    assert from_env(env_of(deployment)).standalone
    with pytest.raises(helm.HelmRenderError, match="replicaCount above 1 needs peering.enabled"):
        render({"peering": {"enabled": False}})


def test_monitors_scrape_the_operator_and_the_workloads(default_objects, custom_objects) -> None:
    assert not only(default_objects, "ServiceMonitor") and not only(default_objects, "PodMonitor")
    service, = only(custom_objects, "Service")
    monitor, = only(custom_objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "http-metrics"
    pods, = only(custom_objects, "PodMonitor")
    assert pods["spec"]["selector"] == {"matchExpressions": [{"key": "tokenmill.dev/kind", "operator": "Exists"}]}
    endpoint, = pods["spec"]["podMetricsEndpoints"]
    # The workloads label their series with the resource's namespace: theirs win over the target's.
    assert endpoint["port"] == "tm-metrics" and endpoint["honorLabels"] is True and endpoint["interval"] == "15s"
    assert pods["spec"]["namespaceSelector"] == {"matchNames": ["research", "prod"]}


def test_the_dashboard_configmap_is_for_grafanas_sidecar(default_objects, custom_objects) -> None:
    configmap, = only(default_objects, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["tokenmill.json"]) == json.loads(
        (CHART / "dashboards" / "tokenmill.json").read_text())
    moved, = only(custom_objects, "ConfigMap")
    assert moved["metadata"]["namespace"] == "monitoring"


def test_the_charts_crds_are_the_generated_ones() -> None:
    """The chart's crds/ holds exactly the repository's crds/ (regenerate both with `make crds`)."""
    root = {path.name: path.read_text() for path in sorted((REPO / "crds").glob("*.yaml"))}
    ours = {name: text for name, text in crds().items() if not name.endswith(".kopf.dev.yaml")}
    assert sorted(ours) == sorted(root)
    for name, text in root.items():
        assert ours[name] == text, f"charts/tokenmill/crds/{name} differs from crds/{name}: run `make crds`"
    peering = {yaml.safe_load(text)["spec"]["names"]["kind"] for name, text in crds().items()
               if name.endswith(".kopf.dev.yaml")}
    assert peering == {"ClusterKopfPeering", "KopfPeering"}
    for text in crds().values():
        kubernetes_schemas.validate(yaml.safe_load(text), KUBERNETES_VERSION, strict=True)


def test_notes_tell_what_to_do_next() -> None:
    text = notes({"defaults": {"store": "s3://models/tokenmill"}})
    assert "kubectl get tokenmill" in text
    assert "s3://models/tokenmill/<namespace>" in text
    assert "kubectl apply --server-side -f" in text
