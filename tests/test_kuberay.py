"""The KubeRay manifests in platform/kuberay/, checked offline (no cluster, no network).

Every manifest validates strictly (tests/kube_schema.py) against the KubeRay v1.7.0 CRDs vendored in
platform/kuberay/crds/ or Kubernetes' core API schemas; then what the schemas cannot say: the RayJob runs
one retrain cycle from the mounted ConfigMap and deletes its cluster afterwards, the CronJob never
overlaps two cycles, credentials only ever come from Secrets, Ray token authentication is on, the GPU
workers have a memory-backed /dev/shm, and the run config asks for no more than the cluster has. The
tests that must fail prove the validator is strict where plain JSON Schema is not.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.kube_schema import (
    CRD_DIR,
    ManifestInvalid,
    SchemaNotFound,
    crd_schemas,
    load_manifests,
    schema_errors,
    strict_errors,
    validate_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "platform" / "kuberay"
MANIFEST_FILES = sorted(KUBERAY.glob("*.yaml"))

# The vendored CRDs as KubeRay v1.7.0 released them (and as its commit feeaf72facab has them).
KUBERAY_CRD_SHA256 = {
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
    "ray.io_raycronjobs.yaml": "31c2c753bba01f7e8e89cb8e8c504131b58ee42090ca536d87f5ac27605a568e",
    "ray.io_rayjobs.yaml": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
}
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
}
# A variable whose name says it holds a secret or an endpoint with one: never a literal in a manifest.
SECRET_LOOKING = re.compile(r"(TOKEN|PASSWORD|SECRET|KEY|USERNAME|_URI|_URL)$")
CONFIG_MOUNT = "/etc/hovle"
CONFIG_PATH = f"{CONFIG_MOUNT}/run.yaml"


@cache
def manifests() -> tuple[dict[str, Any], ...]:
    return tuple(doc for path in MANIFEST_FILES for doc in load_manifests(path))


def one(kind: str) -> dict[str, Any]:
    """The single manifest of `kind` in platform/kuberay/ (a fresh copy: tests may change it)."""
    found = [doc for doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in platform/kuberay/, found {len(found)}"
    return copy.deepcopy(found[0])


def secrets() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: copy.deepcopy(doc) for doc in manifests() if doc["kind"] == "Secret"}


def cluster_specs() -> dict[str, dict[str, Any]]:
    """Every Ray cluster the manifests create: the RayCluster's, the RayJob's, the RayCronJob's."""
    return {
        "RayCluster": one("RayCluster")["spec"],
        "RayJob": one("RayJob")["spec"]["rayClusterSpec"],
        "RayCronJob": one("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def containers(node: Any) -> list[dict[str, Any]]:
    """Every container and init container anywhere inside `node`."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                found += value
            found += containers(value)
    elif isinstance(node, list):
        for item in node:
            found += containers(item)
    return found


def gpu_group(spec: dict[str, Any]) -> dict[str, Any]:
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    return group


def keys(node: Any) -> list[str]:
    """Every mapping key anywhere inside `node`."""
    if isinstance(node, dict):
        return [*map(str, node), *(key for value in node.values() for key in keys(value))]
    if isinstance(node, list):
        return [key for item in node for key in keys(item)]
    return []


def run_config() -> dict[str, Any]:
    return yaml.safe_load(one("ConfigMap")["data"]["run.yaml"])


# --- the schemas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda path: path.name)
def test_every_manifest_validates_strictly(path: Path) -> None:
    manifests = load_manifests(path)
    assert manifests, f"{path.name} holds no resource"
    for manifest in manifests:
        validate_manifest(manifest, path.name)


def test_the_manifests_are_the_six_kinds_the_platform_needs() -> None:
    kinds = sorted(doc["kind"] for doc in manifests())
    assert kinds == [
        "ConfigMap",
        "CronJob",
        "RayCluster",
        "RayCronJob",
        "RayJob",
        "Secret",
        "Secret",
        "Secret",
    ]
    assert one("CronJob")["apiVersion"] == "batch/v1"
    assert {one(kind)["apiVersion"] for kind in ("RayCluster", "RayJob", "RayCronJob")} == {"ray.io/v1"}


def test_the_vendored_crds_are_kuberay_v1_7_0_verbatim_with_their_notice() -> None:
    for name, digest in KUBERAY_CRD_SHA256.items():
        assert hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() == digest, f"{name} was changed"
    assert {kind for _, kind in crd_schemas()} == {"RayCluster", "RayJob", "RayCronJob"}
    notice = (CRD_DIR / "NOTICE").read_text()
    for needed in (
        "KubeRay",
        "https://github.com/ray-project/kuberay",
        "feeaf72facab",
        "v1.7.0",
        "Apache License, Version 2.0",
        "https://www.apache.org/licenses/LICENSE-2.0",
    ):
        assert needed in notice


# --- what the manifests do -----------------------------------------------------------------------------


def test_the_rayjob_runs_one_retrain_from_the_configmap_and_deletes_its_cluster() -> None:
    spec = one("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert shlex.split(spec["entrypoint"]) == ["python", "-m", "jobs.retrain", "--config", CONFIG_PATH]
    # The entrypoint's driver runs on the head: the ConfigMap holding run.yaml is mounted there.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == CONFIG_MOUNT]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    configmap = one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "run.yaml" in configmap["data"]


def test_the_raycronjob_schedules_that_same_rayjob() -> None:
    cron = one("RayCronJob")["spec"]
    assert cron["jobTemplate"] == one("RayJob")["spec"]
    assert len(cron["schedule"].split()) == 5


def test_every_ray_cluster_is_the_raycluster_spec() -> None:
    """The three copies of the cluster spec (YAML has no includes) may not drift apart."""
    specs = cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"]
    assert specs["RayCronJob"] == specs["RayCluster"]


def test_the_cronjob_forbids_overlap_and_submits_to_the_rayclusters_head() -> None:
    cron = one("CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    head_service = f"{one('RayCluster')['metadata']['name']}-head-svc"  # KubeRay's name for it
    assert container["command"] == [
        "python",
        "-m",
        "jobs.submit",
        "--address",
        f"http://{head_service}:8265",
        "--config",
        CONFIG_PATH,
    ]


def test_ray_token_authentication_is_on_everywhere() -> None:
    ray_pin = next(
        dep
        for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if dep.startswith("ray[")
    )
    pinned_minor = re.search(r">=(\d+\.\d+)", ray_pin).group(1)
    for owner, spec in cluster_specs().items():
        assert spec["authOptions"]["mode"] == "token", owner
        # KubeRay refuses token auth below Ray 2.52.0; the version must be the image's Ray.
        version = tuple(int(part) for part in spec["rayVersion"].split("."))
        assert version >= (2, 52, 0) and spec["rayVersion"].startswith(pinned_minor + "."), owner
    # The CronJob's client sends the token KubeRay generated into the Secret named after the RayCluster.
    env = {e["name"]: e for e in containers(one("CronJob"))[0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": one("RayCluster")["metadata"]["name"],
        "key": "auth_token",
    }


def test_credentials_come_only_from_secrets() -> None:
    example_keys = {name: set(doc["stringData"]) for name, doc in secrets().items()}
    for kind in ("RayCluster", "RayJob", "RayCronJob", "CronJob"):
        for container in containers(one(kind)):
            for var in container.get("env", []):
                if SECRET_LOOKING.search(var["name"]) or var["name"] in CREDENTIALS:
                    assert "value" not in var, f"{kind} {container['name']}: {var['name']} is a literal"
                    assert "secretKeyRef" in var["valueFrom"], f"{kind} {container['name']}: {var['name']}"
            for source in container.get("envFrom", []):
                assert set(source) == {"secretRef"}, f"{kind} {container['name']}: envFrom {source}"
    # Every Ray container (head, GPU worker) gets all six: S3 and MLflow are used on every node.
    for owner, spec in cluster_specs().items():
        ray_containers = containers(spec["headGroupSpec"]) + containers(spec["workerGroupSpecs"])
        for container in ray_containers:
            provided = set()
            for source in container["envFrom"]:
                provided |= example_keys[source["secretRef"]["name"]]
            assert CREDENTIALS <= provided, f"{owner} {container['name']} lacks {CREDENTIALS - provided}"


def test_the_example_secrets_hold_placeholders_only() -> None:
    for name, secret in secrets().items():
        assert "data" not in secret, f"{name}: base64 `data` hides what it holds; use stringData"
        assert secret["metadata"]["annotations"]["hovle.example/placeholder"] == "true"
        for key, value in secret["stringData"].items():
            assert "REPLACE-ME" in value, f"{name}.{key} is not a placeholder"
    assert "EXAMPLE ONLY" in (KUBERAY / "secret.example.yaml").read_text().splitlines()[0]


def test_the_run_config_holds_no_credentials_and_reads_everything_from_s3() -> None:
    config = run_config()
    credential_key = re.compile(r"(?i)(password|secret|access_key|auth_token|api_key|username|credential)")
    assert not [key for key in keys(config) if credential_key.search(key) or key.upper() in CREDENTIALS]
    assert "uri" not in config["train"]["tracking"]  # the server comes from MLFLOW_TRACKING_URI
    paths = [
        config["train"]["storage_path"],
        config["retrain"]["prepared"],
        config["eval"]["data"],
        config["eval"]["text"],
        *(p for stage in config["retrain"]["raw"].values() for p in stage),
    ]
    assert all(path.startswith("s3://") for path in paths), paths


def test_the_gpu_workers_mount_a_memory_backed_dev_shm_and_ask_gpus_per_pod() -> None:
    for owner, spec in cluster_specs().items():
        pod = gpu_group(spec)["template"]["spec"]
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", owner
        resources = container["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, owner
        assert resources["requests"] == resources["limits"], owner  # what one GPU's worker gets, reserved
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head["limits"], f"{owner}: the head is a CPU node"


def test_the_run_config_asks_for_no_more_than_the_gpu_group_has() -> None:
    scaling = run_config()["train"]["scaling"]
    group = gpu_group(one("RayCluster")["spec"])
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert scaling["use_gpu"] is True
    gpus = group["replicas"] * int(limits["nvidia.com/gpu"])
    assert scaling["num_workers"] * scaling["gpus_per_worker"] <= gpus
    assert scaling["cpus_per_worker"] <= float(limits["cpu"])


@pytest.mark.slow  # imports the training stack (torch, transformers) to read the config as the job will
def test_the_configmaps_run_config_loads_as_the_job_reads_it(tmp_path: Path) -> None:
    from jobs.run_config import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text(one("ConfigMap")["data"]["run.yaml"])
    run = load_run_config(str(path))
    assert run.retrain is not None and run.eval is not None


# --- what must fail ------------------------------------------------------------------------------------


def test_a_misspelt_rayjob_field_fails_where_plain_jsonschema_accepts_it() -> None:
    rayjob = one("RayJob")
    rayjob["spec"]["shutdownAfterJobFinish"] = rayjob["spec"].pop("shutdownAfterJobFinishes")
    plain = jsonschema.Draft7Validator(crd_schemas()[("ray.io/v1", "RayJob")])
    assert list(plain.iter_errors(rayjob)) == []  # the CRD's schema alone lets it through
    with pytest.raises(ManifestInvalid) as caught:
        validate_manifest(rayjob)
    assert caught.value.problems == [
        "spec.shutdownAfterJobFinish: unknown field 'shutdownAfterJobFinish' "
        "(did you mean 'shutdownAfterJobFinishes'?)"
    ]


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("RayCluster", "gpuCount"),
        ("RayJob", "imagePullPolicyy"),
        ("RayCronJob", "gpuCount"),
        ("CronJob", "imagePullPolicyy"),
    ],
)
def test_an_invented_container_field_fails(kind: str, field: str) -> None:
    manifest = one(kind)
    containers(manifest)[-1][field] = 1
    problems = schema_errors(manifest)
    assert len(problems) == 1 and f"unknown field {field!r}" in problems[0], problems


@pytest.mark.parametrize(
    ("kind", "change", "expected"),
    [
        ("RayJob", lambda m: m["spec"].update(shutdownAfterJobFinishes="yes"), "is not of type 'boolean'"),
        ("RayCluster", lambda m: gpu_group(m["spec"]).update(replicas="two"), "is not of type 'integer'"),
        (
            "RayCluster",
            lambda m: containers(gpu_group(m["spec"]))[0]["resources"]["limits"].update(
                {"nvidia.com/gpu": True}
            ),
            "True is not of type 'integer'; True is not of type 'string'",
        ),
        ("CronJob", lambda m: m["spec"].update(startingDeadlineSeconds="1h"), "is not of type 'integer'"),
        (
            "ConfigMap",
            lambda m: m["data"].update({"run.yaml": {"nested": "mapping"}}),
            "is not of type 'string'",
        ),
        ("RayCluster", lambda m: m["spec"]["authOptions"].update(mode="tokens"), "is not one of"),
    ],
    ids=[
        "bool-as-string",
        "int-as-string",
        "int-or-string-as-bool",
        "cronjob-int",
        "configmap-data",
        "auth-mode-enum",
    ],
)
def test_a_wrong_type_or_value_fails(kind: str, change: Any, expected: str) -> None:
    manifest = one(kind)
    change(manifest)
    problems = schema_errors(manifest)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_repeated_env_name_misspelt_metadata_and_a_cel_guarded_field_fail() -> None:
    cronjob = one("CronJob")
    env = containers(cronjob)[0]["env"]
    env.append(dict(env[0]))
    assert "a list of type 'map' holds each key once" in " ".join(schema_errors(cronjob))
    rayjob = one("RayJob")
    rayjob["metadata"]["lables"] = rayjob["metadata"].pop("labels")
    assert schema_errors(rayjob) == ["metadata.lables: unknown field 'lables' (did you mean 'labels'?)"]
    rayjob = one("RayJob")
    rayjob["spec"]["managedBy"] = "ray.io/kuberay-operator"  # its CEL rules cannot be checked here
    assert "CEL rules" in " ".join(schema_errors(rayjob))


def test_an_unknown_kind_has_no_schema() -> None:
    with pytest.raises(SchemaNotFound):
        schema_errors({"apiVersion": "ray.io/v1", "kind": "RayJobb", "metadata": {"name": "x"}})


def test_preserve_unknown_fields_keeps_an_object_open_and_maps_stay_maps() -> None:
    schema = {
        "type": "object",
        "properties": {
            "open": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    assert strict_errors(schema, {"open": {"a": "x", "b": 1}, "labels": {"any": "key"}}) == []
    assert strict_errors(schema, {"closed": {"a": "x", "b": 1}}) == ["closed.b: unknown field 'b' (known: a)"]
