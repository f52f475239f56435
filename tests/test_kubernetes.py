"""Kubernetes manifests and container image layout (kubernetes/, Dockerfile, .dockerignore).

Every overlay (and each optional component on top of one) is rendered with `kubectl kustomize`, every
rendered object is validated offline against the Kubernetes 1.30 and newest known schemas
(kubernetes-validate), and the properties an SRE relies on are asserted: no management port in any
Service, probes that gate on a READY worker, non-root read-only containers, requests = limits, and a
config.properties that matches the paths the Dockerfile sets up.
"""

from __future__ import annotations

import json
import re
import shlex
import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conette_client.torchserve import parse_properties

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "kubernetes"
OVERLAYS = ("cpu", "gpu")
# Optional components, each rendered on top of the overlay it is meant for.
COMPONENT_CASES = (("cpu", "model-pvc"), ("cpu", "fetch-weights"), ("gpu", "hpa-queue-latency"))
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
        assert "scripts/fetch_weights.py" in command and "scripts/build_mar.sh" in command
        written = {m["name"] for m in init["volumeMounts"] if m["mountPath"] == "/opt/conette/model-store"}
        read = {m["name"] for m in server_container(docs)["volumeMounts"]
                if m["mountPath"] == "/opt/conette/model-store"}
        assert written == read == {"model-store"}
        assert only(docs, "NetworkPolicy")["spec"]["egress"], "the hub download needs egress"
    if component == "hpa-queue-latency":
        (metric,) = only(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == "ts_queue_latency_per_request_microseconds"


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
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == only(docs, "Deployment")["metadata"]["name"]
    assert "replicas" not in only(docs, "Deployment")["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2, "with one replica, a node drain takes the service down"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_inference_and_metrics(rendered, overlay):
    docs = rendered[overlay]
    policy = only(docs, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"] == [], "the server needs no outbound connections"
    ports = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    assert ports == {"http", "metrics"}
    assert all(rule["from"] for rule in policy["ingress"]), "every ingress rule names its peers"


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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_termination_fits_the_grace_period(rendered, overlay):
    docs = rendered[overlay]
    command = server_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[1:3] == [PROBE_SCRIPT, "stop"]
    grace = float(command[command.index("--endpoint-grace-s") + 1])
    drain = float(command[command.index("--drain-timeout-s") + 1])
    frontend_exit = 10  # the JVM's own shutdown after SIGTERM (seconds, generous)
    assert grace > 0
    assert pod_spec(docs)["terminationGracePeriodSeconds"] >= grace + drain + frontend_exit


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
    assert dockerfile["entrypoint"] == ["/usr/bin/tini", "--"]
    assert dockerfile["cmd"][:3] == ["torchserve", "--foreground", "--ncs"]
    assert "8081" not in (REPO / "Dockerfile").read_text().split("EXPOSE", 1)[1].splitlines()[0]


def test_dockerignore_keeps_every_copied_source(dockerfile):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is a whitelist"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for source, _ in dockerfile["copies"]:
        assert source.rstrip("/") in included, f"COPY {source} is excluded by .dockerignore"
        assert (REPO / source).exists(), f"COPY source {source} missing from the repository"


# --- KServe ----------------------------------------------------------------------------------------------

def test_kserve_examples_parse_and_use_the_storage_layout():
    docs = kustomize(KUBERNETES / "kserve")
    runtime = only(docs, "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    args = container["args"]
    assert args[:3] == ["torchserve", "--foreground", "--ncs"]
    assert args[args.index("--ts-config") + 1] == "/mnt/models/config/config.properties"
    assert args[args.index("--model-store") + 1] == "/mnt/models/model-store"
    assert all(port["containerPort"] != MANAGEMENT_PORT for port in container["ports"])
    services = objects(docs, "InferenceService")
    assert sorted(s["spec"]["predictor"]["model"]["protocolVersion"] for s in services) == ["v1", "v2"]
    for service in services:
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
        assert model["storageUri"]


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
    spec = importlib.util.spec_from_file_location("torchserve_pod", PROBE_SOURCE)
    pod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pod)
    ts_server.wait_for_workers(1)
    args = argparse.Namespace(model=MODEL_NAME, management_url=ts_server.management_url, key_file=ts_server.key_file)
    versions = pod.describe_model(args)
    assert pod.pending_requests(versions) == 0
    # The worker loaded a model, so it has used CPU time: the pid TorchServe reports is readable in /proc.
    assert pod.worker_cpu_ticks(versions) > 0
