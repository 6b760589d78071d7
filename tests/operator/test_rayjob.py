"""Pure parts: names, labels, the RayJob manifest, configuration, the work queue, `tokenmill render`."""

from __future__ import annotations

import asyncio
import re
import shlex

import pytest
import yaml

from tests.operator.conftest import corpus, ref, stage
from tokenmill.api.loader import parse_resource
from tokenmill.api.placement import PodExtras
from tokenmill.cli import main
from tokenmill.operator import naming, rayjob
from tokenmill.operator.config import ConfigError, OperatorConfig, from_env
from tokenmill.operator.workqueue import WorkQueue

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def parsed(document):
    document = {**document, "metadata": {**document["metadata"], "uid": "0000-uid"}}
    resource, problems = parse_resource(document)
    assert resource is not None, problems
    return resource


@pytest.mark.parametrize("kind", ["CorpusFilter", "SyntheticDataJob", "TrainingStage", "PTSJob"])
@pytest.mark.parametrize("name", [
    "web", "x", "1-starts-with-a-digit", "a" * 253, "with.dots.in.it", "a" * 40 + ".b" * 20, "ends-" + "z" * 60,
])
@pytest.mark.parametrize("attempt", [1, 9, 101, 123456])
def test_rayjob_names_are_short_dns_labels_and_deterministic(kind, name, attempt):
    job = naming.rayjob_name(kind, name, attempt)
    assert len(job) <= naming.MAX_RAYJOB_NAME
    assert DNS1035.match(job), job
    assert job.endswith(f"-{attempt}")
    assert job == naming.rayjob_name(kind, name, attempt)


def test_short_clean_names_are_readable():
    assert naming.rayjob_name("TrainingStage", "pretrain", 1) == "ts-pretrain-1"
    assert naming.rayjob_name("PTSJob", "search", 12) == "pts-search-12"


def test_shortened_names_never_collide():
    names = ["a.b", "a-b", "x" * 60, "x" * 61, "x" * 59 + ".y", "x" * 59 + "-y"]
    jobs = {naming.rayjob_name("CorpusFilter", name, 1) for name in names}
    assert len(jobs) == len(names)
    assert naming.rayjob_name("CorpusFilter", "a-b", 1) == "cf-a-b-1"
    assert naming.rayjob_name("CorpusFilter", "a.b", 1) != "cf-a-b-1"


def test_label_values_fit():
    assert naming.label_value("web") == "web"
    long = "n" * 200
    assert len(naming.label_value(long)) <= 63 and naming.label_value(long) != naming.label_value("n" * 201)
    assert naming.owner_selector("CorpusFilter", "web") == "tokenmill.dev/kind=CorpusFilter,tokenmill.dev/name=web"


def test_rayjob_manifest_defaults():
    resource = parsed(corpus("web", inputs=[{"name": "raw", "uri": "s3://bucket/raw"}]))
    config = OperatorConfig(image="registry/ray:1", credentials_secret="s3-creds", ray_env={"AWS_REGION": "eu-west-1"},
                            cpu_node_selector={"pool": "cpu"},
                            cpu_tolerations=({"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"},))
    manifest = rayjob.render(resource, namespace="team", attempt=3, spec_uri="s3://bucket/out/_run/spec.json",
                             config=config)
    meta, spec = manifest["metadata"], manifest["spec"]
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert meta["name"] == "cf-web-3" and meta["namespace"] == "team"
    assert meta["labels"] == {"tokenmill.dev/kind": "CorpusFilter", "tokenmill.dev/name": "web",
                              "tokenmill.dev/attempt": "3", "app.kubernetes.io/managed-by": "tokenmill-operator"}
    assert meta["ownerReferences"] == [{"apiVersion": "tokenmill.dev/v1alpha1", "kind": "CorpusFilter", "name": "web",
                                        "uid": "0000-uid", "controller": True, "blockOwnerDeletion": True}]
    assert spec["entrypoint"] == "python -m tokenmill.trainer corpus-filter --spec s3://bucket/out/_run/spec.json"
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == 3600 and spec["preRunningDeadlineSeconds"] == 1800
    assert "activeDeadlineSeconds" not in spec
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    for pod in (head, worker):
        (container,) = pod["containers"]
        assert container["image"] == "registry/ray:1"
        # Only the store keys a workload reads, each from the Secret: never the whole Secret.
        assert "envFrom" not in container
        assert {"name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}} in container["env"]
        assert {"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "s3-creds", "key": "AWS_SESSION_TOKEN", "optional": True}}} in container["env"]
        assert {"name": "AWS_REGION", "value": "eu-west-1"} in container["env"]
        assert {"name": "TOKENMILL_ATTEMPT", "value": "3"} in container["env"]
        # A CorpusFilter needs no GPUs: the CPU pool.
        assert pod["nodeSelector"] == {"pool": "cpu"}
        assert pod["tolerations"] == [{"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"}]
        # Restricted pods.
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert pod["automountServiceAccountToken"] is False
    assert "nvidia.com/gpu" not in worker["containers"][0]["resources"]["limits"]  # gpusPerWorker: 0
    assert worker["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Gi"}}]
    assert "queue-name" not in str(meta["labels"])  # no queue named, none configured
    # The driver runs on the head and serves the workload's metrics on a named port there.
    assert head["containers"][0]["ports"] == [{"name": "tm-metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert {"name": "TOKENMILL_METRICS_PORT", "value": "9464"} in head["containers"][0]["env"]
    assert "ports" not in worker["containers"][0]
    assert all(item["name"] != "TOKENMILL_METRICS_PORT" for item in worker["containers"][0]["env"])


def test_kinds_that_need_gpus_go_to_the_gpu_pool_and_shm_fits_the_memory_limit():
    config = OperatorConfig(cpu_node_selector={"pool": "cpu"})
    document = stage("pretrain", datasets=[{**ref("CorpusFilter", "web"), "weight": 1.0}])
    document["spec"]["ray"]["workers"].update({"memoryPerWorker": "64Gi", "sharedMemory": "256Gi"})
    manifest = rayjob.render(parsed(document), namespace="default", attempt=1, spec_uri="s3://b/x/_run/spec.json",
                             config=config)
    (group,) = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # /dev/shm is an in-memory emptyDir that counts against the 64Gi limit: it gets half of it.
    assert worker["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32768Mi"}}]
    assert rayjob.quantity_value("1.5Gi") == 1.5 * 2**30 and rayjob.quantity_value("500m") == 0.5


def test_rayjob_spec_ray_overrides_defaults():
    document = stage("pretrain", datasets=[{**ref("CorpusFilter", "web"), "weight": 1.0}])
    document["spec"]["ray"] = {
        "image": "custom:2", "workers": {"replicas": 4, "gpusPerWorker": 8, "cpusPerWorker": "64",
                                         "memoryPerWorker": "512Gi", "sharedMemory": "64Gi"},
        "head": {"cpus": "8", "memory": "32Gi"},
        "nodeSelector": {"pool": "h100"}, "tolerations": [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}],
        "queueName": "research", "activeDeadlineSeconds": 86400, "preRunningDeadlineSeconds": 600,
        "ttlSecondsAfterFinished": 60,
    }
    document["spec"]["output"] = {"uri": "s3://bucket/x", "credentialsSecret": {"name": "mine"}}
    document["spec"]["optimization"]["globalBatchSequences"] = 64
    manifest = rayjob.render(parsed(document), namespace="default", attempt=1, spec_uri="s3://bucket/x/_run/spec.json",
                             config=OperatorConfig(credentials_secret="default-creds"))
    spec = manifest["spec"]
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
    assert spec["activeDeadlineSeconds"] == 86400 and spec["preRunningDeadlineSeconds"] == 600
    assert spec["ttlSecondsAfterFinished"] == 60
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]
    container = worker["containers"][0]
    assert group["replicas"] == 4 and container["image"] == "custom:2"
    assert container["resources"]["limits"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert {"name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "mine", "key": "AWS_ACCESS_KEY_ID"}}} in container["env"]
    assert worker["nodeSelector"] == {"pool": "h100"}
    assert worker["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"]["limits"] == {"cpu": "8", "memory": "32Gi"}


def test_entrypoint_is_fixed_tokens_and_quoted():
    uri = "s3://bucket/a'b;rm -rf/_run/spec.json"
    with pytest.raises(ValueError):
        rayjob.entrypoint("CorpusFilter", uri)  # white space never reaches a command line
    tricky = "s3://bucket/a'b;$(reboot)/_run/spec.json"
    command = rayjob.entrypoint("PTSJob", tricky)
    assert shlex.split(command) == ["python", "-m", "tokenmill.trainer", "pts", "--spec", tricky]
    with pytest.raises(ValueError):
        rayjob.entrypoint("PTSJob", "http://example.com/spec.json")


def test_config_from_environment():
    config = from_env({
        "TOKENMILL_STORE": "s3://store", "TOKENMILL_GPU_NODE_SELECTOR": "pool=h100, zone=a",
        "TOKENMILL_GPU_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]', "TOKENMILL_NAMESPACES": "a, b",
        "TOKENMILL_RAY_ENV": '{"AWS_ENDPOINT_URL": "http://minio:9000"}', "TOKENMILL_STANDALONE": "true",
        "TOKENMILL_RESYNC_SECONDS": "5", "TOKENMILL_PEERING_PRIORITY": "7",
    })
    assert config.store == "s3://store" and config.node_selector == {"pool": "h100", "zone": "a"}
    assert config.tolerations == ({"key": "gpu", "operator": "Exists"},)
    assert config.namespaces == ("a", "b") and not config.clusterwide
    assert config.ray_env == {"AWS_ENDPOINT_URL": "http://minio:9000"} and config.standalone
    assert config.resync_seconds == 5 and config.priority() == 7
    defaults = from_env({})
    assert defaults.clusterwide and defaults.store is None and defaults.node_selector == {"nvidia.com/gpu.present": "true"}
    assert 100 <= defaults.priority() < 2**31
    for bad in ({"TOKENMILL_GPU_TOLERATIONS": "{"}, {"TOKENMILL_RESYNC_SECONDS": "soon"},
                {"TOKENMILL_GPU_NODE_SELECTOR": "novalue"}, {"TOKENMILL_QUEUE": "h100 research"},
                {"TOKENMILL_QUEUE": "q" * 64}):
        with pytest.raises(ConfigError):
            from_env(bad)


def test_a_rayjob_goes_to_the_configured_queue_unless_its_spec_names_one():
    config = from_env({"TOKENMILL_QUEUE": "h100-default"})
    document = stage("pretrain", datasets=[{**ref("CorpusFilter", "web"), "weight": 1.0}])
    manifest = rayjob.render(parsed(document), namespace="default", attempt=1, spec_uri="s3://b/x/_run/spec.json",
                             config=config)
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100-default"
    document["spec"]["ray"]["queueName"] = "research"
    manifest = rayjob.render(parsed(document), namespace="default", attempt=1, spec_uri="s3://b/x/_run/spec.json",
                             config=config)
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"


async def test_work_queue_coalesces_and_never_runs_a_key_twice_at_once():
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(3):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    key = await queue.get()
    assert key == "a"
    queue.add("a")  # while "a" is processed: once more afterwards, not concurrently
    assert len(queue) == 1
    assert await queue.get() == "b"
    queue.done("b")
    queue.done("a")
    assert await asyncio.wait_for(queue.get(), 1) == "a"
    queue.done("a")
    queue.add_after("c", 0.05)
    queue.add_after("c", 10)  # the earlier schedule wins
    assert await asyncio.wait_for(queue.get(), 1) == "c"
    queue.close()


def test_render_command_prints_every_rayjob(write_recipe, capsys):
    folder = write_recipe(
        corpus="""
        apiVersion: tokenmill.dev/v1alpha1
        kind: CorpusFilter
        metadata: {name: web}
        spec:
          inputs: [{name: raw, uri: "s3://bucket/raw"}]
        """,
        stage="""
        apiVersion: tokenmill.dev/v1alpha1
        kind: TrainingStage
        metadata: {name: pretrain}
        spec:
          stage: pretrain
          model: {config: tiny}
          datasets: [{ref: {kind: CorpusFilter, name: web}, weight: 1.0, uniqueTokens: 100000}]
          sequenceLength: 128
          optimization: {globalBatchSequences: 8, microBatchSequences: 2, peakLearningRate: 0.001, totalTokens: 2048}
          ray: {workers: {replicas: 2, gpusPerWorker: 0}}
        """,
    )
    assert main(["render", str(folder), "--store", "s3://bucket/runs", "--namespace", "ml"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in documents] == ["cf-web-1", "ts-pretrain-1"]
    assert documents[1]["spec"]["entrypoint"] == (
        "python -m tokenmill.trainer training-stage --spec s3://bucket/runs/ml/trainingstages/pretrain/_run/spec.json")
    assert documents[0]["metadata"]["namespace"] == "ml"


def test_render_command_reports_problems(write_recipe, capsys):
    folder = write_recipe(corpus="""
        apiVersion: tokenmill.dev/v1alpha1
        kind: CorpusFilter
        metadata: {name: web}
        spec:
          inputs: [{name: raw, uri: "file:relative/raw"}]
        """)
    assert main(["render", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "relative file: URIs are only for the local runner" in err
    assert "spec.output.uri: required: no default store" in err


def test_generator_api_key_comes_from_its_secret():
    document = {
        "apiVersion": "tokenmill.dev/v1alpha1", "kind": "SyntheticDataJob", "metadata": {"name": "teacher-data"},
        "spec": {"seeds": [{"uri": "s3://bucket/seeds"}], "datasetType": "math",
                 "workflow": [{"type": "rewrite", "rewrite": {"targets": ["exercise"]}}],
                 "generator": {"engine": "openai", "endpoint": "https://llm.example.com/v1", "modelName": "teacher",
                               "apiKeySecret": {"name": "llm-key", "key": "token"}}},
    }
    manifest = rayjob.render(parsed(document), namespace="default", attempt=1, spec_uri="s3://bucket/s/_run/spec.json",
                             config=OperatorConfig())
    for group in (manifest["spec"]["rayClusterSpec"]["headGroupSpec"],
                  *manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]):
        env = group["template"]["spec"]["containers"][0]["env"]
        assert {"name": "TOKENMILL_GENERATOR_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "llm-key", "key": "token"}}} in env
    assert manifest["metadata"]["name"] == "sdj-teacher-data-1"


def test_pod_additions_merge_into_every_group_over_the_operators_defaults():
    defaults = PodExtras.model_validate({
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "NCCL_IB_HCA", "value": "mlx5"}],
        "extraResources": {"rdma/ib": "1"}, "priorityClassName": "training",
    })
    document = stage("pretrain", datasets=[{**ref("CorpusFilter", "web"), "weight": 1.0}])
    document["spec"]["ray"]["pod"] = {
        "env": [{"name": "NCCL_IB_HCA", "value": "mlx5_0,mlx5_1"}],
        "extraResources": {"vpc.amazonaws.com/efa": "32"},
        "annotations": {"k8s.v1.cni.cncf.io/networks": "ib-net"},
        "volumes": [{"name": "datasets", "mountPath": "/mnt/datasets",
                     "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}],
        "topology": {"required": "cloud.example.com/topology-block"},
    }
    manifest = rayjob.render(parsed(document), namespace="default", attempt=1, spec_uri="s3://b/x/_run/spec.json",
                             config=OperatorConfig(pod_extras=defaults))
    cluster = manifest["spec"]["rayClusterSpec"]
    head, (group,) = cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"]
    worker = group["template"]
    for template in (head, worker):
        pod = template["spec"]
        (container,) = pod["containers"]
        assert {"name": "NCCL_IB_HCA", "value": "mlx5_0,mlx5_1"} in container["env"]  # the spec wins, by name
        assert {"name": "NCCL_DEBUG", "value": "WARN"} in container["env"]
        assert pod["priorityClassName"] == "training"
        assert {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}} in pod["volumes"]
        assert {"name": "datasets", "mountPath": "/mnt/datasets", "readOnly": True} in container["volumeMounts"]
        assert template["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "ib-net"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False  # tokenmill's own stays
    limits = worker["spec"]["containers"][0]["resources"]["limits"]
    assert limits["rdma/ib"] == "1" and limits["vpc.amazonaws.com/efa"] == "32" and limits["memory"] == "1600Gi"
    assert "rdma/ib" not in head["spec"]["containers"][0]["resources"]["limits"]  # devices on the workers only
    assert worker["metadata"]["annotations"]["kueue.x-k8s.io/podset-required-topology"] == \
        "cloud.example.com/topology-block"
    assert "kueue.x-k8s.io/podset-required-topology" not in head["metadata"].get("annotations", {})
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["spec"]["containers"][0]["volumeMounts"]


def test_pod_additions_cannot_replace_what_the_operator_owns():
    from tokenmill.operator.config import ConfigError, from_env

    for bad in ({"env": [{"name": "TOKENMILL_ATTEMPT", "value": "9"}]}, {"extraResources": {"nvidia.com/gpu": "16"}},
                {"volumes": [{"name": "dshm", "mountPath": "/x", "emptyDir": {}}]},
                {"volumes": [{"name": "x", "mountPath": "/dev/shm/", "emptyDir": {}}]}):
        document = corpus("web", inputs=[{"name": "raw", "uri": "s3://bucket/raw"}])
        document["spec"]["ray"]["pod"] = bad
        resource, problems = parse_resource(document)
        assert resource is None and problems, bad
    with pytest.raises(ConfigError, match="TOKENMILL_RAY_POD"):
        from_env({"TOKENMILL_RAY_POD": '{"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}'})
    assert from_env({"TOKENMILL_RAY_POD": '{"priorityClassName": "p"}'}).pod_extras.priority_class_name == "p"
