#!/usr/bin/env bash
# Build the CPU container image with podman, run it the way Kubernetes does, and caption real audio with it.
#
#   sudo scripts/build_image.sh [IMAGE_TAG]        (default conette-serve:cpu-local)
#
# For machines without a Docker engine or registry access to base images (see docs/kubernetes.md):
# podman with the runc runtime, a Debian bookworm base made with debootstrap from Debian's mirror, pip from
# PyPI with the host's CA bundle (for a TLS-intercepting proxy) and the local wheel store as extra find-links.
# The download.pytorch.org CPU index is unreachable here, so torch comes from PyPI, whose Linux torch 2.14.1 is
# the CUDA build: the image is ~7 GB here, a registry build with the Dockerfile's default CPU index is not.
# Steps: base image -> image build -> test checkpoint + .mar made in the image (mounted read-only) -> container with
# a read-only root filesystem, non-root UID, no capabilities -> readiness probe -> caption request (token from
# key_file.json, as a user of the plain image does) -> graceful stop: `podman stop` with requests in flight, all of
# which must be answered -> the KServe runtime's command line: health routes and an OIP v2 request on its port.
#
# Environment: WORK_DIR (scratch, default /var/tmp/conette-image), LOCAL_WHEELS (find-links dir for pip,
# default /opt/pypi-more/files when present), CA_BUNDLE (CA certificates for pip, default the host's),
# TORCH_INDEX_URL (default https://pypi.org/simple), PORT_BASE (host ports PORT_BASE+0/1/2 for inference/
# management/metrics, default 38080; the container shares the host network), KEEP=1 keeps the container.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${1:-conette-serve:cpu-local}"
work="${WORK_DIR:-/var/tmp/conette-image}"
base_image=localhost/conette-base:bookworm
container=conette-serve-check
port_base="${PORT_BASE:-38080}"
inference_port=$port_base management_port=$((port_base + 1)) metrics_port=$((port_base + 2))
ca_bundle="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
local_wheels="${LOCAL_WHEELS:-/opt/pypi-more/files}"

log() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "error: run as root (rootful podman; debootstrap)" >&2
    exit 1
fi
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap
fi
mkdir -p "$work"
# Containers may not set rlimits here ("error setting rlimit ... operation not permitted"): a private
# containers.conf without default ulimits, instead of editing /etc/containers.
printf '[containers]\ndefault_ulimits = []\n' > "$work/containers.conf"
export CONTAINERS_CONF="$work/containers.conf"
podman() { command podman --runtime runc "$@"; }

if ! podman image exists "$base_image"; then
    log "base image: debootstrap bookworm (minbase) -> $base_image"
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian
    tar -C "$work/rootfs" -c . | podman import - "$base_image"
    rm -rf "$work/rootfs"
fi

log "image build: $image"
build_args=(--build-arg "BASE_IMAGE=$base_image" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}")
volumes=()
pip_args=()
if [ -f "$ca_bundle" ]; then
    volumes+=(-v "$ca_bundle:/run/build-ca.crt:ro")
    pip_args+=(--cert /run/build-ca.crt)
fi
if [ -d "$local_wheels" ]; then
    volumes+=(-v "$local_wheels:/run/wheels:ro")
    pip_args+=(--find-links /run/wheels)
fi
build_args+=(--build-arg "PIP_EXTRA_ARGS=${pip_args[*]}")
time podman build --network=host --pull=never "${volumes[@]}" "${build_args[@]}" -t "$image" "$repo_root"
podman image ls "$image"

log "test checkpoint and model archive, made inside the image as the fetch-weights init container does"
rm -rf "$work/model-store" && mkdir -p "$work/model-store"
# Same restrictions as the pod; the model store is the only writable mount besides tmpfs /tmp (U: owned by
# the container user, as fsGroup makes the emptyDirs writable in Kubernetes).
podman run --rm --network=host --read-only --tmpfs /tmp:rw,size=768m,U \
    --user 1000:1000 --cap-drop ALL --security-opt no-new-privileges \
    -v "$work/model-store:/opt/conette/model-store:U" "$image" sh -c \
    'python /opt/conette/tools/make_test_checkpoint.py /tmp/checkpoint &&
     /opt/conette/scripts/build_mar.sh /tmp/checkpoint /opt/conette/model-store'
ls -l "$work/model-store"

log "run: read-only root, UID 1000, no capabilities, tmpfs for /tmp and /home/model-server"
podman rm -f "$container" >/dev/null 2>&1 || true
# The host network (bridge networking is unavailable here) means the binds move to free ports through
# TS_* overrides, which enable_envvars_config=true in the baked config.properties allows.
podman run -d --name "$container" --network=host \
    --read-only --tmpfs /tmp:rw,size=768m,U --tmpfs /home/model-server:rw,size=64m,U \
    --user 1000:1000 --cap-drop ALL --security-opt no-new-privileges \
    -v "$work/model-store:/opt/conette/model-store:ro" \
    -e TS_INFERENCE_ADDRESS="http://127.0.0.1:$inference_port" \
    -e TS_MANAGEMENT_ADDRESS="http://127.0.0.1:$management_port" \
    -e TS_METRICS_ADDRESS="http://127.0.0.1:$metrics_port" \
    -e TS_GRPC_INFERENCE_PORT=$((port_base + 10)) -e TS_GRPC_MANAGEMENT_PORT=$((port_base + 11)) \
    "$image"
cleanup() { [ "${KEEP:-0}" = 1 ] || podman rm -f "$container" >/dev/null 2>&1 || true; }
trap cleanup EXIT

probe=(podman exec "$container" /usr/bin/python3 /opt/conette/bin/torchserve_pod.py)
started=$(date +%s)
until "${probe[@]}" ready --management-url "http://127.0.0.1:$management_port" >/dev/null; do
    if [ "$(podman inspect -f '{{.State.Running}}' "$container")" != true ]; then
        podman logs "$container" | tail -40
        echo "error: the container exited before the model was READY" >&2
        exit 1
    fi
    if [ $(( $(date +%s) - started )) -gt 300 ]; then
        podman logs "$container" | tail -40
        echo "error: no READY worker after 300 s" >&2
        exit 1
    fi
    sleep 2
done
"${probe[@]}" ready --management-url "http://127.0.0.1:$management_port"
echo "READY after $(( $(date +%s) - started )) s"

log "caption request (token auth is on in the image's default config)"
inference_key=$(podman exec "$container" cat /home/model-server/key_file.json \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["inference"]["key"])')
espeak-ng -w "$work/speech.wav" "a dog barks while rain falls on the roof"
sox -D "$work/speech.wav" -r 44100 -c 2 "$work/request.flac"
echo "without token: HTTP $(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: audio/flac' \
    --data-binary @"$work/request.flac" "http://127.0.0.1:$inference_port/predictions/conette")"
curl -sS --fail-with-body -X POST -H "Authorization: Bearer $inference_key" -H 'Content-Type: audio/flac' \
    --data-binary @"$work/request.flac" "http://127.0.0.1:$inference_port/predictions/conette"
echo
echo "metrics: $(curl -s "http://127.0.0.1:$metrics_port/metrics" | grep -c '^ts_inference_requests_total') ts_inference_requests_total series"
podman exec "$container" sh -c 'id; touch /opt/conette/probe-write 2>&1 || true'

log "graceful stop: podman stop (SIGTERM) while $((IN_FLIGHT=${IN_FLIGHT:-12})) requests are in flight"
sox -D -n -r 44100 -c 2 "$work/long.flac" synth 30 pinknoise vol 0.3
for i in $(seq "$IN_FLIGHT"); do
    curl -s -o /dev/null -w '%{http_code}\n' -X POST -H "Authorization: Bearer $inference_key" \
        -H 'Content-Type: audio/flac' --data-binary @"$work/long.flac" \
        "http://127.0.0.1:$inference_port/predictions/conette" > "$work/in-flight.$i" &
done
sleep 2
stop_started=$(date +%s)
podman stop -t 300 "$container" >/dev/null
wait
echo "container exited with $(podman inspect -f '{{.State.ExitCode}}' "$container") after $(( $(date +%s) - stop_started )) s"
echo "answers to the $IN_FLIGHT requests in flight: $(cat "$work"/in-flight.* | sort | uniq -c | tr -s ' \n' ' ')"
podman logs "$container" 2>&1 | grep -E 'SIGTERM|draining|TorchServe exited|drain budget' | sed -n '1p;$p'
bad=$(cat "$work"/in-flight.* | grep -vc '^200$' || true)

log "KServe runtime (kubernetes/kserve/servingruntime.yaml command line): health routes and OIP v2 on its port"
front_port=$((port_base + 5)) upstream_port=$((port_base + 6))
podman rm -f "$container" >/dev/null 2>&1 || true
podman run -d --name "$container" --network=host \
    --read-only --tmpfs /tmp:rw,size=768m,U --tmpfs /home/model-server:rw,size=64m,U \
    --user 1000:1000 --cap-drop ALL --security-opt no-new-privileges \
    -v "$work/model-store:/mnt/models/model-store:ro" \
    -e TS_INFERENCE_ADDRESS="http://127.0.0.1:$upstream_port" -e TS_DISABLE_TOKEN_AUTHORIZATION=true \
    -e TS_MANAGEMENT_ADDRESS="http://127.0.0.1:$management_port" \
    -e TS_METRICS_ADDRESS="http://127.0.0.1:$metrics_port" \
    -e TS_GRPC_INFERENCE_PORT=$((port_base + 10)) -e TS_GRPC_MANAGEMENT_PORT=$((port_base + 11)) \
    "$image" /usr/bin/python3 /opt/conette/bin/torchserve_pod.py serve --kserve-port "$front_port" \
    --management-url "http://127.0.0.1:$management_port" --upstream-url "http://127.0.0.1:$upstream_port" -- \
    torchserve --foreground --ncs --ts-config /opt/conette/config/config.properties \
    --model-store /mnt/models/model-store --log-config /opt/conette/config/log4j2.xml
started=$(date +%s)
until curl -sf "http://127.0.0.1:$front_port/v2/health/ready" >/dev/null; do
    if [ $(( $(date +%s) - started )) -gt 300 ]; then podman logs "$container" | tail -40; exit 1; fi
    sleep 2
done
for route in /v2/health/live /v2/health/ready /v2/models/conette/ready /v1/models/conette; do
    echo "GET $route: $(curl -s -w ' HTTP %{http_code}' "http://127.0.0.1:$front_port$route")"
done
python3 -c 'import base64, json, sys; print(json.dumps({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
    "data": [base64.b64encode(open(sys.argv[1], "rb").read()).decode()]}]}))' "$work/request.flac" > "$work/v2.json"
echo "POST /v2/models/conette/infer: $(curl -s -w ' HTTP %{http_code}' -H 'Content-Type: application/json' \
    --data-binary @"$work/v2.json" "http://127.0.0.1:$front_port/v2/models/conette/infer" | cut -c1-300)"
podman stop -t 60 "$container" >/dev/null
echo "KServe-mode container exited with $(podman inspect -f '{{.State.ExitCode}}' "$container")"
if [ "$bad" != 0 ]; then
    echo "error: $bad of the $IN_FLIGHT requests in flight at podman stop were not answered 200" >&2
    exit 1
fi
