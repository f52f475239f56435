#!/usr/bin/env bash
# Package a CoNeTTE checkpoint and the handler into a TorchServe model archive (usage below, or --help).
set -euo pipefail

usage="usage: scripts/build_mar.sh CHECKPOINT_DIR [EXPORT_DIR] [--no-archive]

Package a CoNeTTE checkpoint and the handler into a TorchServe model archive.

CHECKPOINT_DIR: official Hugging Face format (config.json + pytorch_model.bin) or serving format
  (config.json + model.safetensors + vocab.json). Official checkpoints are converted to the serving format
  first (scripts/convert_checkpoint.py), so the archive holds no pickle.
EXPORT_DIR: where conette.mar (or, with --no-archive, the conette/ directory for volume mounts) is written;
  default model_store/.
Environment: PYTHON (default .venv/bin/python if present), MODEL_NAME (conette), MODEL_VERSION (default:
  handler/conette_engine/VERSION, the project's version)."

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive_format=default
positional=()
for arg in "$@"; do
    case "$arg" in
        --no-archive) archive_format=no-archive ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) positional+=("$arg") ;;
    esac
done
if [ "${#positional[@]}" -lt 1 ] || [ "${#positional[@]}" -gt 2 ]; then
    echo "${usage%%$'\n'*}" >&2
    exit 2
fi
checkpoint_dir="$(cd "${positional[0]}" && pwd)"
export_dir="${positional[1]:-$repo_root/model_store}"
model_name="${MODEL_NAME:-conette}"
model_version="${MODEL_VERSION:-$(cat "$repo_root/handler/conette_engine/VERSION")}"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x "$repo_root/.venv/bin/python" ] && PYTHON="$repo_root/.venv/bin/python"
fi
archiver="$(dirname "$(command -v "$PYTHON")")/torch-model-archiver"
[ -x "$archiver" ] || archiver=torch-model-archiver

staging="$(mktemp -d "${TMPDIR:-/tmp}/conette-mar.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
# Everything in $staging/files lands at the root of the model directory TorchServe extracts; the worker has
# that directory on PYTHONPATH, so `import conette_engine` and `import conette_protocol` work there.
mkdir -p "$staging/files"

if [ -f "$checkpoint_dir/model.safetensors" ] && [ -f "$checkpoint_dir/vocab.json" ]; then
    cp "$checkpoint_dir/config.json" "$checkpoint_dir/model.safetensors" "$checkpoint_dir/vocab.json" \
        "$staging/files/"
elif [ -f "$checkpoint_dir/pytorch_model.bin" ]; then
    echo "converting $checkpoint_dir (official format) to the serving format"
    PYTHONPATH="$repo_root/handler${PYTHONPATH:+:$PYTHONPATH}" \
        "$PYTHON" "$repo_root/scripts/convert_checkpoint.py" "$checkpoint_dir" "$staging/files"
else
    echo "error: $checkpoint_dir holds neither model.safetensors + vocab.json nor pytorch_model.bin" >&2
    exit 1
fi

# The engine and protocol packages the handler imports, without bytecode caches.
cp -r "$repo_root/handler/conette_engine" "$staging/files/conette_engine"
cp -r "$repo_root/handler/conette_protocol" "$staging/files/conette_protocol"
find "$staging/files" -name __pycache__ -type d -prune -exec rm -rf {} +

mkdir -p "$export_dir"
if [ "$archive_format" = no-archive ]; then
    rm -rf "${export_dir:?}/$model_name"  # the previous directory: the archiver does not replace it
fi
# The archiver stages its files in $TMPDIR/<model name>: a private TMPDIR keeps concurrent builds apart.
TMPDIR="$staging" "$archiver" \
    --model-name "$model_name" \
    --version "$model_version" \
    --handler "$repo_root/handler/conette_handler.py" \
    --config-file "$repo_root/handler/model-config.yaml" \
    --extra-files "$staging/files" \
    --archive-format "$archive_format" \
    --export-path "$export_dir" \
    --force
if [ "$archive_format" = no-archive ]; then
    echo "wrote $export_dir/$model_name/"
else
    echo "wrote $export_dir/$model_name.mar"
fi
