"""Kubernetes manifests and container image layout (kubernetes/, Dockerfile, .dockerignore).

Every overlay (and each optional component on top of one) is rendered with `kubectl kustomize`, every
rendered object of a built-in kind is validated offline against the Kubernetes 1.30 and newest known schemas
(kubernetes-validate); custom resources (KServe, Prometheus Operator) get structural checks of their own.
The properties an SRE relies on are asserted: no management port in any Service, probes that gate on a
READY worker, non-root read-only containers, requests = limits, a drain budget derived from the model's
limits, a config.properties that matches the paths the Dockerfile sets up. The image's entry point
(kubernetes/image/torchserve_pod.py) runs against a real TorchServe: SIGTERM with requests in flight, and
the KServe health routes.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml
from audio_factory import make_audio
from conftest import VENV_BIN, TorchServeInstance, free_ports

from conette_client.torchserve import parse_properties

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "kubernetes"
OVERLAYS = ("cpu", "gpu")
# Optional components, each rendered on top of the overlay it is meant for.
COMPONENT_CASES = (("cpu", "model-pvc"), ("cpu", "fetch-weights"), ("cpu", "hpa-queue-latency"), ("cpu", "ingress"),
                   ("gpu", "prometheus-operator"))
# Kinds defined by CRDs: no Kubernetes schema to validate them against (structural checks below instead).
CUSTOM_KINDS = {"InferenceService", "ServingRuntime", "PodMonitor", "PrometheusRule"}
MODEL_CONFIG = REPO / "handler" / "model-config.yaml"
SCHEMA_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
MANAGEMENT_PORT = 8081
MODEL_NAME = "conette"
PROBE_SCRIPT = "/opt/conette/bin/torchserve_pod.py"
PROBE_SOURCE = KUBERNETES / "image" / "torchserve_pod.py"
# Settings the cluster config may set differently from the project's config.properties (binds, image paths,
# envvar overrides, JVM flags); every other setting must be identical.
CONTAINER_OVERRIDES = {
    "inference_address", "management_address", "metrics_address", "model_store", "workflow_store",
    "metrics_config", "enable_envvars_config", "vmargs",
}


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is required to render the Kustomize overlays: kubectl >= 1.27 (kustomize v5: `labels`, "
                    "components), e.g. the `kubectl` .deb these machines come with; Debian bookworm's own "
                    "`kubernetes-client` (1.20) is too old")
    return path


def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def read_properties(text: str) -> dict[str, str]:
    return parse_properties(text, strict=True)


def parse_dockerfile() -> dict:
    """ARG defaults, ENV values, COPY pairs, USER, WORKDIR, ENTRYPOINT and CMD (exec form) of the Dockerfile."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    info = {"args": {}, "env": {}, "copies": [], "runs": []}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            info["args"][name] = default.strip('"')
        elif instruction == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                info["env"][name] = value
        elif instruction == "COPY":
            *sources, destination = rest.split()
            info["copies"].extend((source, destination) for source in sources)
        elif instruction == "RUN":
            info["runs"].append(rest)
        elif instruction in ("USER", "WORKDIR"):
            info[instruction.lower()] = rest
        elif instruction in ("ENTRYPOINT", "CMD"):
            info[instruction.lower()] = json.loads(rest)  # exec form only: signals reach the process
    return info


def copied_to(dockerfile: dict, source: str) -> str:
    destinations = [dst for src, dst in dockerfile["copies"] if src.rstrip("/") == source]
    assert len(destinations) == 1, f"Dockerfile must COPY {source} exactly once"
    return destinations[0]


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def only(docs: list[dict], kind: str) -> dict:
    found = objects(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return only(docs, "Deployment")["spec"]["template"]["spec"]


def server_container(docs: list[dict]) -> dict:
    (container,) = [c for c in pod_spec(docs)["containers"] if c["name"] == "torchserve"]
    return container


def cluster_config(docs: list[dict]) -> dict[str, str]:
    (config_map,) = [cm for cm in objects(docs, "ConfigMap") if cm["metadata"]["name"].startswith("conette-config")]
    return read_properties(config_map["data"]["config.properties"])


def address_port(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"https?://([^:/]+):(\d+)", address)
    assert match, f"unexpected address {address}"
    return match.group(1), int(match.group(2))


def render_with_component(tmp_path: Path, overlay: str, component: str) -> list[dict]:
    """The overlay as a user would change it: a copy of kubernetes/ with the component added to the overlay."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree)
    kustomization_file = tree / "overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(kustomization_file.read_text())
    kustomization["components"] = [f"../../components/{component}"]
    kustomization_file.write_text(yaml.safe_dump(kustomization))
    return kustomize(tree / "overlays" / overlay)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: kustomize(KUBERNETES / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def dockerfile() -> dict:
    return parse_dockerfile()


# --- rendering and schemas -------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_object_kind(rendered, overlay):
    kinds = sorted(doc["kind"] for doc in rendered[overlay])
    assert kinds == sorted(["Namespace", "ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "NetworkPolicy"])
    for doc in rendered[overlay]:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "conette"


def validate_all(docs: list[dict]) -> None:
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(rendered, overlay):
    validate_all(rendered[overlay])


def test_schema_validation_rejects_a_misspelled_field(rendered):
    # The validator really checks (strict mode rejects unknown fields), so a pass above means something.
    deployment = json.loads(json.dumps(only(rendered["cpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay,component", COMPONENT_CASES)
def test_component_renders_and_validates(tmp_path, overlay, component):
    docs = render_with_component(tmp_path, overlay, component)
    validate_all(docs)
    spec = pod_spec(docs)
    main_image = server_container(docs)["image"]
    for container in spec.get("initContainers", []):
        assert container["image"] == main_image, "init containers must get the overlay's image too"
    if component == "model-pvc":
        claim = only(docs, "PersistentVolumeClaim")["metadata"]["name"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "model-store"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim
    if component == "fetch-weights":
        (init,) = spec["initContainers"]
        command = " ".join(init["command"] + init["args"])
        assert "conette-fetch-weights --out" in command and "scripts/build_mar.sh" in command
        written = {m["name"] for m in init["volumeMounts"] if m["mountPath"] == "/opt/conette/model-store"}
        read = {m["name"] for m in server_container(docs)["volumeMounts"]
                if m["mountPath"] == "/opt/conette/model-store"}
        assert written == read == {"model-store"}
        assert only(docs, "NetworkPolicy")["spec"]["egress"], "the hub download needs egress"
    if component == "hpa-queue-latency":
        assert hpa_metric_names(docs) == ["ts_queue_latency_per_request_microseconds"]
    if component == "ingress":
        check_ingress(docs)
    if component == "prometheus-operator":
        check_prometheus_operator_objects(docs)


def hpa_metric_names(docs: list[dict]) -> list[str]:
    metrics = only(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    return [m["resource"]["name"] if m["type"] == "Resource" else m[m["type"].lower()]["metric"]["name"]
            for m in metrics]


def adapter_metric_names() -> set[str]:
    values = yaml.safe_load((KUBERNETES / "components" / "hpa-queue-latency" / "prometheus-adapter-values.yaml")
                            .read_text())
    return {rule["name"]["as"] for rule in values["rules"]["custom"]}


def declared_metrics() -> set[str]:
    declared = yaml.safe_load((REPO / "metrics.yaml").read_text())
    return {metric["name"] for section in ("ts_metrics", "model_metrics")
            for group in declared.get(section, {}).values() for metric in group}


def check_ingress(docs: list[dict]) -> None:
    ingress = only(docs, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "auth-type"] and annotations[prefix + "auth-secret"], "the ingress must authenticate"
    assert ingress["spec"]["tls"], "credentials only over TLS"
    units = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    body = annotations[prefix + "proxy-body-size"]
    body_bytes = int(body[:-1]) * units[body[-1].lower()] if body[-1].isalpha() else int(body)
    config = cluster_config(docs)
    assert body_bytes >= int(config["max_request_size"]), "the ingress would refuse bodies the server accepts"
    worst_wait = drain_budget_s(model_config())
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[prefix + name]) >= worst_wait, f"{name} below the longest queue wait {worst_wait} s"
    service = only(docs, "Service")
    (path,) = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert path["backend"]["service"]["name"] == service["metadata"]["name"]
    assert path["backend"]["service"]["port"]["name"] == "http"
    # The NetworkPolicy must admit the ingress controller's namespace, or the Ingress reaches nothing.
    peers = [peer for rule in only(docs, "NetworkPolicy")["spec"]["ingress"] for peer in rule["from"]]
    assert any(peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
               == "ingress-nginx" for peer in peers)


def check_prometheus_operator_objects(docs: list[dict]) -> None:
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    monitor = only(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector and all(pod_labels.get(k) == v for k, v in selector.items())
    ports = {p["name"]: p["containerPort"] for p in server_container(docs)["ports"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    rule = only(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert {"ConetteHighErrorRate", "ConetteQueueLatencyHigh", "ConetteWorkerRestarts"} <= set(alerts)
    known = declared_metrics()
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["summary"], name
        used = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\{", alert["expr"]))
        assert used, f"{name}: no metric selector in {alert['expr']!r}"
        assert used <= known | {"kube_pod_container_status_restarts_total"}, f"{name} uses undeclared {used - known}"
        assert alert["expr"].count("(") == alert["expr"].count(")"), name


# --- exposure --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_or_container_exposes_the_management_port(rendered, overlay):
    docs = rendered[overlay]
    container = server_container(docs)
    named_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert MANAGEMENT_PORT not in named_ports.values()
    for service in objects(docs, "Service"):
        for port in service["spec"]["ports"]:
            target = named_ports.get(port["targetPort"], port["targetPort"])
            assert MANAGEMENT_PORT not in (port["port"], target), f"Service {service['metadata']['name']} exposes 8081"
    config = cluster_config(docs)
    assert address_port(config["management_address"]) == ("127.0.0.1", MANAGEMENT_PORT)
    assert address_port(config["inference_address"]) == ("0.0.0.0", named_ports["http"])
    assert address_port(config["metrics_address"]) == ("0.0.0.0", named_ports["metrics"])
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert config[key] == "127.0.0.1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(rendered, overlay):
    docs = rendered[overlay]
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    assert selects(only(docs, "Deployment")["spec"]["selector"]["matchLabels"])
    assert selects(only(docs, "Service")["spec"]["selector"])
    assert selects(only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert selects(only(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    constraints = pod_spec(docs)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(selects(c["labelSelector"]["matchLabels"]) for c in constraints)
    # A hard spread would cap the Deployment at one pod per node (per zone): scale-ups would stay Pending.
    assert {c["whenUnsatisfiable"] for c in constraints} == {"ScheduleAnyway"}
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == only(docs, "Deployment")["metadata"]["name"]
    assert "replicas" not in only(docs, "Deployment")["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2, "with one replica, a node drain takes the service down"
    # CPU pods scale on CPU; GPU pods on queue latency (their CPU stays low while the queue fills).
    if overlay == "gpu":
        assert hpa_metric_names(docs) == ["ts_queue_latency_per_request_microseconds"]
        assert set(hpa_metric_names(docs)) <= adapter_metric_names(), "the adapter must serve the HPA's metric"
    else:
        assert hpa_metric_names(docs) == ["cpu"]
    budget = only(docs, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1 and budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollouts_fit_the_node_pool(rendered, overlay):
    rolling = only(rendered[overlay], "Deployment")["spec"]["strategy"]["rollingUpdate"]
    if overlay == "gpu":
        # A full GPU pool has no room for a surge pod: an old pod must be allowed to go first.
        assert rolling["maxUnavailable"] >= 1
    else:
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0), "CPU rollouts never lose capacity"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_inference_and_metrics(rendered, overlay):
    docs = rendered[overlay]
    policy = only(docs, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"] == [], "the server needs no outbound connections"
    ports = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    assert ports == {"http", "metrics"}
    check_peers(policy)


def check_peers(policy: dict) -> None:
    """Every peer is named: namespaces by kubernetes.io/metadata.name (set by the API server, unforgeable),
    pod labels only within a named namespace or the policy's own; never pods of any namespace."""
    assert all(rule["from"] for rule in policy["ingress"]), "every ingress rule names its peers"
    for peer in (peer for rule in policy["ingress"] for peer in rule["from"]):
        assert "ipBlock" not in peer
        if "namespaceSelector" in peer:
            assert set(peer["namespaceSelector"]) == {"matchLabels"}, peer
            assert list(peer["namespaceSelector"]["matchLabels"]) == ["kubernetes.io/metadata.name"], peer
        else:
            assert peer["podSelector"]["matchLabels"], peer


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_annotations_point_at_the_metrics_port(rendered, overlay):
    docs = rendered[overlay]
    annotations = only(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in server_container(docs)["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert cluster_config(docs)["metrics_mode"] == "prometheus"


# --- probes and termination ------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_gate_on_a_ready_worker(rendered, overlay):
    docs = rendered[overlay]
    container = server_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    liveness = container["livenessProbe"]["httpGet"]
    assert liveness["path"] == "/ping" and ports.get(liveness["port"], liveness["port"]) == 8080
    # /ping carries no token: it only works because token auth is off in the cluster (and must stay so).
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "true"
    assert cluster_config(docs)["enable_envvars_config"] == "true", "TS_* overrides are ignored without it"
    load_models = cluster_config(docs)["load_models"]
    for probe_name in ("startupProbe", "readinessProbe"):
        command = container[probe_name]["exec"]["command"]
        assert command[1:3] == [PROBE_SCRIPT, "ready"], probe_name
        assert command[command.index("--model") + 1] == MODEL_NAME
    assert load_models.split("=")[0] == MODEL_NAME
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "model load needs minutes, not seconds"


def model_config() -> dict:
    return yaml.safe_load(MODEL_CONFIG.read_text())


def drain_budget_s(config: dict) -> int:
    """Longest a queue can take to empty: the batch running plus a full queue in batches, each bounded by
    responseTimeout (TorchServe ends a batch that runs longer), shared by the model's workers."""
    batches = 1 + math.ceil(config["jobQueueSize"] / config["batchSize"])
    return math.ceil(batches * config["responseTimeout"] / config["maxWorkers"])


def test_drain_budget_arithmetic():
    # The numbers docs/kubernetes.md shows: 1 + ceil(100 / 8) = 14 batches of at most 120 s on one worker.
    assert drain_budget_s({"jobQueueSize": 100, "batchSize": 8, "responseTimeout": 120, "maxWorkers": 1}) == 1680
    assert drain_budget_s({"jobQueueSize": 16, "batchSize": 8, "responseTimeout": 60, "maxWorkers": 2}) == 90


def check_termination(pod: dict, container: dict) -> None:
    """The grace period is the drain budget (endpoint grace + worst queue + stop margin), and the entry point
    gets that same value; no preStop hook (SIGTERM itself drains)."""
    pod_module = load_pod_module()
    env = {e["name"]: e.get("value") for e in container["env"]}
    endpoint_grace = float(env["CONETTE_ENDPOINT_GRACE_S"])
    assert endpoint_grace > 0, "load balancers need a moment to drop a terminating endpoint"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace == endpoint_grace + drain_budget_s(model_config()) + pod_module.STOP_MARGIN_S
    assert env["CONETTE_TERMINATION_GRACE_S"] == str(grace)
    assert "lifecycle" not in container, "graceful stop is the entry point's SIGTERM handler"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_termination_fits_the_grace_period(rendered, overlay, dockerfile):
    docs = rendered[overlay]
    check_termination(pod_spec(docs), server_container(docs))
    assert "command" not in server_container(docs) and "args" not in server_container(docs), "the image's CMD runs"


# --- security and resources ------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_non_root_read_only(rendered, overlay, dockerfile):
    docs = rendered[overlay]
    spec = pod_spec(docs)
    uid = int(dockerfile["args"]["APP_UID"])
    assert dockerfile["user"].split(":")[0] in ("${APP_UID}", str(uid)), "the image runs as the fixed UID"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["fsGroup"] == int(dockerfile["args"]["APP_GID"])
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"] + spec.get("initContainers", []):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_emptydirs_where_the_image_writes(rendered, overlay, dockerfile):
    docs = rendered[overlay]
    spec = pod_spec(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in server_container(docs)["volumeMounts"]}
    for path in (dockerfile["env"]["TEMP"], dockerfile["workdir"]):
        assert "emptyDir" in mounts[path], f"{path} must be a writable emptyDir"
        assert mounts[path]["emptyDir"].get("sizeLimit"), f"{path} needs a size limit"
    assert dockerfile["env"]["LOG_LOCATION"].startswith(dockerfile["workdir"] + "/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_requests_equal_limits(rendered, overlay):
    spec = pod_spec(rendered[overlay])
    for container in spec["containers"] + spec.get("initContainers", []):
        resources = container["resources"]
        assert {"cpu", "memory", "ephemeral-storage"} <= set(resources["limits"])
        assert resources["requests"] == resources["limits"], container["name"]


def test_gpu_overlay_requests_one_gpu_and_tells_torchserve(rendered):
    container = server_container(rendered["gpu"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TS_NUMBER_OF_GPU"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["image"].endswith("-gpu")
    assert only(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]["nodeSelector"]
    assert "nvidia.com/gpu" not in server_container(rendered["cpu"])["resources"]["limits"]


# --- config.properties vs the image ----------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_is_the_file_the_image_bakes(rendered, overlay, dockerfile):
    docs = rendered[overlay]
    baked = KUBERNETES / "base" / "config.properties"
    assert cluster_config(docs) == read_properties(baked.read_text())
    config_dir = copied_to(dockerfile, "kubernetes/base/config.properties")
    ts_config = dockerfile["cmd"][dockerfile["cmd"].index("--ts-config") + 1]
    assert ts_config == config_dir.rstrip("/") + "/config.properties"
    (mount,) = [m for m in server_container(docs)["volumeMounts"] if m.get("subPath") == "config.properties"]
    assert mount["mountPath"] == ts_config


def test_config_paths_match_the_image_layout(dockerfile):
    config = read_properties((KUBERNETES / "base" / "config.properties").read_text())
    assert config["model_store"] == copied_to(dockerfile, "model_store").rstrip("/")
    assert f"mkdir -p {config['workflow_store']}" in " ".join(dockerfile["runs"])
    assert config["metrics_config"] == copied_to(dockerfile, "metrics.yaml")
    log_config = dockerfile["cmd"][dockerfile["cmd"].index("--log-config") + 1]
    assert log_config == copied_to(dockerfile, "kubernetes/base/log4j2.xml").rstrip("/") + "/log4j2.xml"
    assert copied_to(dockerfile, "kubernetes/image/torchserve_pod.py") == PROBE_SCRIPT
    assert config["load_models"] == f"{MODEL_NAME}={MODEL_NAME}.mar"


def test_config_keeps_every_project_setting_except_container_overrides():
    project = read_properties((REPO / "config.properties").read_text())
    cluster = read_properties((KUBERNETES / "base" / "config.properties").read_text())
    assert set(cluster) - set(project) <= CONTAINER_OVERRIDES
    for key, value in project.items():
        if key not in CONTAINER_OVERRIDES:
            assert cluster.get(key) == value, f"{key}: project {value!r}, cluster {cluster.get(key)!r}"
    # Secure by default outside Kubernetes too: the image's own config keeps token auth on.
    assert cluster["disable_token_authorization"] == "false"
    assert cluster["enable_model_api"] == "false"


def test_image_runs_torchserve_in_the_foreground_under_tini(dockerfile):
    # tini forwards SIGTERM to the entry point, which drains and then stops `torchserve --foreground`.
    assert dockerfile["entrypoint"] == ["/usr/bin/tini", "--"]
    assert dockerfile["cmd"][:4] == ["/usr/bin/python3", PROBE_SCRIPT, "serve", "--"]
    assert dockerfile["cmd"][4:7] == ["torchserve", "--foreground", "--ncs"]
    assert "8081" not in (REPO / "Dockerfile").read_text().split("EXPOSE", 1)[1].splitlines()[0]


def test_base_image_is_pinned_by_digest(dockerfile):
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", dockerfile["args"]["BASE_IMAGE"])


def test_dockerignore_keeps_every_copied_source(dockerfile):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is a whitelist"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for source, _ in dockerfile["copies"]:
        assert source.rstrip("/") in included, f"COPY {source} is excluded by .dockerignore"
        assert (REPO / source).exists(), f"COPY source {source} missing from the repository"


# --- KServe ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kserve_docs() -> list[dict]:
    return kustomize(KUBERNETES / "kserve")


def test_kserve_examples_parse_and_use_the_storage_layout(kserve_docs, dockerfile):
    docs = kserve_docs
    runtime = only(docs, "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    args = container["args"]
    assert args[:3] == ["/usr/bin/python3", PROBE_SCRIPT, "serve"]
    torchserve = args[args.index("--") + 1:]
    assert torchserve[:3] == ["torchserve", "--foreground", "--ncs"]
    # The image's own config (no copy to drift), with the model store from KServe's storage initializer.
    image_config = dockerfile["cmd"][dockerfile["cmd"].index("--ts-config") + 1]
    assert torchserve[torchserve.index("--ts-config") + 1] == image_config
    assert torchserve[torchserve.index("--model-store") + 1] == "/mnt/models/model-store"
    assert all(port["containerPort"] != MANAGEMENT_PORT for port in container["ports"])
    services = objects(docs, "InferenceService")
    assert sorted(s["spec"]["predictor"]["model"]["protocolVersion"] for s in services) == ["v1", "v2"]
    for service in services:
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
        assert model["storageUri"]


def test_kserve_runtime_serves_the_routes_kserve_calls(kserve_docs):
    runtime = only(kserve_docs, "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    args = container["args"]
    front_port = int(args[args.index("--kserve-port") + 1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http1"] == front_port == 8080, "KServe sends traffic to the container's first port, 8080"
    # TorchServe listens where the entry point forwards, on loopback only.
    env = {e["name"]: e.get("value") for e in container["env"]}
    upstream = args[args.index("--upstream-url") + 1]
    assert env["TS_INFERENCE_ADDRESS"] == upstream and address_port(upstream)[0] == "127.0.0.1"
    assert env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "true"
    # Probes call the health routes the entry point answers (tested against a real TorchServe below).
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": front_port}, probe
    assert int(runtime["metadata"]["annotations"]["prometheus.kserve.io/port"]) == ports["metrics"]


def test_kserve_pods_pass_the_restricted_pod_security_standard(kserve_docs):
    namespace = only(kserve_docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    (container,) = only(kserve_docs, "ServingRuntime")["spec"]["containers"]
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"] and context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/home/model-server"} <= mounts
    for service in objects(kserve_docs, "InferenceService"):
        predictor = service["spec"]["predictor"]
        assert predictor["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert predictor["securityContext"]["runAsNonRoot"] is True
        assert service["metadata"]["namespace"] == namespace["metadata"]["name"]
        check_termination(predictor, container)
    assert container["resources"]["requests"] == container["resources"]["limits"]


def test_kserve_image_and_network_policy(kserve_docs):
    (container,) = only(kserve_docs, "ServingRuntime")["spec"]["containers"]
    kustomization = yaml.safe_load((KUBERNETES / "kserve" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert container["image"] == f"{image['newName']}:{image['newTag']}", "the image is set by kustomize `images:`"
    validate_all(kserve_docs)
    policy = only(kserve_docs, "NetworkPolicy")["spec"]
    (expression,) = policy["podSelector"]["matchExpressions"]
    assert expression["key"] == "serving.kserve.io/inferenceservice" and expression["operator"] == "In"
    assert set(expression["values"]) == {s["metadata"]["name"] for s in objects(kserve_docs, "InferenceService")}
    ports = {p["containerPort"] for p in container["ports"]}
    assert {port["port"] for rule in policy["ingress"] for port in rule["ports"]} == ports
    assert policy["egress"] == []
    check_peers(policy)


# --- the pod helper against a real TorchServe -------------------------------------------------------------

def run_probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE_SOURCE), *args], capture_output=True, text=True, timeout=60)


def test_readiness_probe_passes_only_for_a_model_with_a_ready_worker(ts_server):
    ts_server.wait_for_workers(1)
    common = ("--management-url", ts_server.management_url, "--key-file", str(ts_server.key_file))
    ready = run_probe("ready", *common)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert "1 READY worker" in ready.stdout
    unknown = run_probe("ready", "--model", "no-such-model", *common)
    assert unknown.returncode == 1 and "not ready" in unknown.stdout
    closed = run_probe("ready", "--management-url", "http://127.0.0.1:9")
    assert closed.returncode == 1 and "not ready" in closed.stdout
    if ts_server.key_file.is_file():  # token auth on: the management key is what gets the probe in
        no_key = run_probe("ready", "--management-url", ts_server.management_url, "--key-file", "/nonexistent")
        assert no_key.returncode == 1


def test_drain_sees_the_worker_process_of_a_real_torchserve(ts_server):
    pod = load_pod_module()
    ts_server.wait_for_workers(1)
    args = argparse.Namespace(model=MODEL_NAME, management_url=ts_server.management_url, key_file=ts_server.key_file)
    versions = pod.describe_model(args)
    assert pod.pending_requests(versions) == 0
    # The worker loaded a model, so it has used CPU time: the pid TorchServe reports is readable in /proc.
    assert pod.worker_cpu_ticks(versions) > 0


def load_pod_module():
    spec = importlib.util.spec_from_file_location("torchserve_pod", PROBE_SOURCE)
    pod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pod)
    return pod


class EntryPoint:
    """`torchserve_pod.py serve -- torchserve ...` as the image runs it, around a test TorchServe config."""

    def __init__(self, workdir: Path, model_store: Path, serve_args: tuple = (), env: dict | None = None,
                 overrides: dict | None = None):
        self.server = TorchServeInstance(workdir=workdir, model_store=model_store, overrides=overrides or {})
        self.server.temp_dir.mkdir(parents=True, exist_ok=True)
        (workdir / "no-workflows").mkdir(exist_ok=True)
        config = self.server.write_config()
        self.log = workdir / "entry-point.out"
        self.process = subprocess.Popen(
            [sys.executable, str(PROBE_SOURCE), "serve", *serve_args, "--management-url", self.server.management_url,
             "--upstream-url", self.server.inference_url,
             "--", str(VENV_BIN / "torchserve"), "--foreground", "--ncs", "--ts-config", str(config)],
            cwd=workdir, env={**self.server.env, **(env or {})}, stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        self.server.process = self.process  # wait_for_workers fails fast if the entry point exits
        try:
            self.server.wait_for_workers(1, timeout=240)
        except BaseException:
            self.kill()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.server.process = None
        self.server.stop()  # the TorchServe session is a separate process group: stop it too

    def terminate_and_wait(self, timeout: float) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the entry point did not exit within {timeout} s:\n{self.output()[-3000:]}") from None


def concurrent_requests(count: int, send) -> tuple[list, threading.Thread]:
    """Start `count` calls of send() in parallel; returns the (response, finished monotonic time) list that
    fills as they complete, and the thread that joins them."""
    results = []

    def one():
        try:
            response = send()
        except requests.RequestException as error:
            response = error
        results.append((response, time.monotonic()))

    workers = [threading.Thread(target=one) for _ in range(count)]
    for worker in workers:
        worker.start()
    joiner = threading.Thread(target=lambda: [worker.join() for worker in workers])
    joiner.start()
    return results, joiner


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> bytes:
    return make_audio(tmp_path_factory.mktemp("clip"), "flac", seconds=30.0).read_bytes()


def test_sigterm_drains_every_request_in_flight(tmp_path, model_store_dir, long_clip):
    # What `docker stop` / `podman stop` / the kubelet do: SIGTERM to the container's main process.
    entry = EntryPoint(tmp_path, model_store_dir)
    try:
        server = entry.server
        sent = 12  # more than one batch (batchSize 8): some wait in the queue when SIGTERM arrives
        results, joiner = send_until_queued(server, long_clip, sent)
        signalled = time.monotonic()
        status = entry.terminate_and_wait(timeout=240)
        joiner.join(timeout=60)
    finally:
        entry.kill()
    output = entry.output()
    codes = [getattr(response, "status_code", repr(response)) for response, _ in results]
    assert codes == [200] * sent, output[-3000:]
    in_flight = [finished for _, finished in results if finished > signalled]
    assert in_flight, "no request was in flight at SIGTERM: the test proves nothing"
    assert status == 0, output[-3000:]
    assert "(drained)" in output and "drain budget exhausted" not in output
    assert not server.own_processes(), "TorchServe processes left after the entry point exited"


def send_until_queued(server: TorchServeInstance, clip: bytes, count: int) -> tuple[list, threading.Thread]:
    """Send `count` caption requests at once and return when TorchServe has some of them queued (the others
    are in the batch the worker runs): from then on, all of them are in flight."""
    results, joiner = concurrent_requests(count, lambda: server.request(
        "POST", "/conette/predict", data=clip, headers={"Content-Type": "audio/flac"}, timeout=300))
    deadline = time.monotonic() + 60
    while True:
        response = server.request("GET", f"/models/{server.model_name}", api="management")
        if response.ok and response.json()[0]["jobQueueStatus"]["pendingRequests"] > 0:
            return results, joiner
        assert time.monotonic() < deadline, "the requests never reached the queue"
        time.sleep(0.1)


def test_drain_stops_at_the_termination_grace_period(tmp_path, model_store_dir, long_clip):
    # A grace period just above the stop margin leaves no time to drain: the entry point must give up and
    # stop TorchServe itself (saying so) instead of being killed in the middle of the drain.
    pod = load_pod_module()
    grace = pod.STOP_MARGIN_S + 1
    entry = EntryPoint(tmp_path, model_store_dir, env={"CONETTE_TERMINATION_GRACE_S": str(grace)})
    try:
        server = entry.server
        results, joiner = send_until_queued(server, long_clip, 12)
        signalled = time.monotonic()
        entry.terminate_and_wait(timeout=grace + 30)
        stopped_after = time.monotonic() - signalled
        joiner.join(timeout=120)
    finally:
        entry.kill()
    output = entry.output()
    assert "drain budget exhausted" in output, output[-3000:]
    assert stopped_after < grace, f"stopped {stopped_after:.1f} s after SIGTERM, past the {grace} s grace period"


def test_kserve_front_answers_health_routes_and_forwards_inference(tmp_path, model_store_dir, long_clip):
    front_port = free_ports({"front": 18090})["front"]
    entry = EntryPoint(tmp_path, model_store_dir, overrides={"disable_token_authorization": "true"},
                       serve_args=("--kserve-port", str(front_port), "--endpoint-grace-s", "3"))
    try:
        front = f"http://127.0.0.1:{front_port}"
        server = entry.server
        expected = {
            "/v2/health/live": (200, {"live": True}),
            "/v2/health/ready": (200, {"ready": True}),
            f"/v2/models/{MODEL_NAME}/ready": (200, {"name": MODEL_NAME, "ready": True}),
            f"/v1/models/{MODEL_NAME}": (200, {"name": MODEL_NAME, "ready": True}),
            "/v1/models": (200, {"models": [MODEL_NAME]}),
        }
        for path, (code, body) in expected.items():
            response = requests.get(front + path, timeout=10)
            assert (response.status_code, response.json()) == (code, body), path
        for path in ("/v2/models/other/ready", "/v1/models/other"):
            response = requests.get(front + path, timeout=10)
            assert response.status_code == 404 and response.json()["error"]["type"] == "ModelNotFound"
        # TorchServe itself has none of these routes: the front is what makes them answer.
        assert server.request("GET", "/v2/health/ready").status_code == 404
        # Inference is TorchServe's, unchanged, in both KServe protocols; concurrent requests still batch.
        audio = base64.b64encode(long_clip).decode()
        v1 = requests.post(f"{front}/v1/models/{MODEL_NAME}:predict", json={"instances": [{"audio": {"b64": audio}}]},
                           timeout=120)
        assert v1.status_code == 200, v1.text
        assert v1.json()["predictions"][0]["caption"]
        v2_body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": [audio]}]}
        results, joiner = concurrent_requests(6, lambda: requests.post(
            f"{front}/v2/models/{MODEL_NAME}/infer", json=v2_body, timeout=300))
        joiner.join(timeout=300)
        assert [getattr(r, "status_code", repr(r)) for r, _ in results] == [200] * 6
        assert all(r.json()["outputs"] for r, _ in results)
        bad = requests.post(f"{front}/v2/models/{MODEL_NAME}/infer", json={"inputs": "nope"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["type"], bad.text
        sizes = {m.group(1): float(m.group(2)) for m in re.finditer(r"^BatchSize_(sum|count)\{.*\} (\S+)$",
                                                                     server.metrics_text(), re.M)}
        assert sizes["sum"] > sizes["count"], f"no batch held more than one request: {sizes}"
        # SIGTERM: still serving during the endpoint grace, but no longer ready (KServe and load balancers
        # stop sending), then drained and stopped.
        entry.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert requests.get(front + "/v2/health/ready", timeout=10).status_code == 503
        assert requests.get(front + "/v2/health/live", timeout=10).status_code == 200
        assert entry.process.wait(timeout=120) == 0, entry.output()[-3000:]
    finally:
        entry.kill()


@pytest.mark.parametrize("kustomization", ["overlays/cpu", "overlays/gpu", "kserve"])
def test_image_tags_carry_the_project_version(kustomization):
    """One version string: the image tag an overlay deploys starts with conette_engine/VERSION."""
    version = (REPO / "handler" / "conette_engine" / "VERSION").read_text().strip()
    spec = yaml.safe_load((KUBERNETES / kustomization / "kustomization.yaml").read_text())
    tags = [image["newTag"] for image in spec["images"]]
    assert tags and all(tag.split("-")[0] == version for tag in tags), tags
