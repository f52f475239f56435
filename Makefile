# conette-serve: CoNeTTE audio captioning on TorchServe.
#
#   make serve [CHECKPOINT=dir]   set up everything, build the .mar, start TorchServe in the background, wait until
#                                 a worker is READY (8080 inference, 8081 management, 8082 metrics)
#   make stop                     stop it
#   make test                     the whole test suite (starts its own TorchServe on 18080-18082)
#
# Other targets: install, weights, mar [CHECKPOINT=dir], mar-dir [CHECKPOINT=dir], bench.
# CHECKPOINT: a folder in the official format (config.json + pytorch_model.bin) or the serving format
# (config.json + model.safetensors + vocab.json); default: the official weights fetched into weights/conette.
# Every step is skipped when its outputs are newer than its inputs.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PYTHON := $(VENV)/bin/python
TORCHSERVE := $(VENV)/bin/torchserve
VENV_STAMP := $(VENV)/.installed
DEFAULT_CHECKPOINT := weights/conette
CHECKPOINT ?= $(DEFAULT_CHECKPOINT)
MODEL_STORE := model_store
MAR := $(MODEL_STORE)/conette.mar
MAR_DIR := $(MODEL_STORE)/conette
# Records which checkpoint the archive was built from, so a different CHECKPOINT= rebuilds it.
CHECKPOINT_RECORD := build/checkpoint-path
READY_TIMEOUT_S ?= 300
TS_PID_FILE := $(or $(TEMP),$(TMPDIR),/tmp)/.model_server.pid

MAR_INPUTS := handler/conette_handler.py handler/model-config.yaml scripts/build_mar.sh \
	$(wildcard handler/conette_engine/*.py handler/conette_engine/data/*) $(wildcard handler/conette_protocol/*.py) \
	$(wildcard $(addprefix $(CHECKPOINT)/,config.json pytorch_model.bin model.safetensors vocab.json)) \
	$(if $(filter $(DEFAULT_CHECKPOINT),$(CHECKPOINT)),$(DEFAULT_CHECKPOINT)/pytorch_model.bin) \
	$(CHECKPOINT_RECORD)
# Debian packages: FFmpeg decodes the audio, Java 17 runs TorchServe's frontend, SoX and espeak-ng make test audio.
APT_PACKAGES := ffmpeg sox espeak-ng
APT := $(if $(filter 0,$(shell id -u)),,sudo) apt-get

.PHONY: help install system-packages weights mar mar-dir serve stop test bench FORCE

help:
	@sed -n '2,12p' Makefile | sed 's/^# \{0,1\}//'

install: system-packages $(VENV_STAMP)

system-packages:
	@missing="$$(for tool in $(APT_PACKAGES); do command -v $$tool >/dev/null || echo $$tool; done)"; \
	command -v java >/dev/null || missing="$$missing default-jre-headless"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(APT) update -q && DEBIAN_FRONTEND=noninteractive $(APT) install -y -q --no-install-recommends $$missing; \
	fi

$(VENV_STAMP): requirements.txt requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $@

weights: $(DEFAULT_CHECKPOINT)/pytorch_model.bin

$(DEFAULT_CHECKPOINT)/pytorch_model.bin: | $(VENV_STAMP)
	$(PYTHON) scripts/fetch_weights.py --out $(DEFAULT_CHECKPOINT)

$(CHECKPOINT_RECORD): FORCE
	@mkdir -p $(dir $@)
	@echo "$(abspath $(CHECKPOINT))" | cmp -s - $@ || echo "$(abspath $(CHECKPOINT))" > $@

mar: $(MAR)

$(MAR): $(MAR_INPUTS) | $(VENV_STAMP)
	PYTHON=$(PYTHON) scripts/build_mar.sh $(CHECKPOINT) $(MODEL_STORE)

# The unpacked model directory (torch-model-archiver --archive-format no-archive), for volume mounts (Kubernetes).
mar-dir: $(MAR_DIR)/MAR-INF/MANIFEST.json

$(MAR_DIR)/MAR-INF/MANIFEST.json: $(MAR_INPUTS) | $(VENV_STAMP)
	PYTHON=$(PYTHON) scripts/build_mar.sh $(CHECKPOINT) $(MODEL_STORE) --no-archive

# Started from the repository root: config.properties' relative paths, logs/ and key_file.json live here.
serve: system-packages $(MAR)
	@if [ -f $(TS_PID_FILE) ] && kill -0 "$$(cat $(TS_PID_FILE))" 2>/dev/null; then \
		echo "TorchServe is already running (make stop, then make serve, to restart it)"; \
	else \
		mkdir -p logs; $(TORCHSERVE) --start --ncs --ts-config config.properties > logs/start.txt 2>&1 \
			|| { cat logs/start.txt; exit 1; }; \
	fi
	@echo "waiting for a READY worker (logs in logs/)..."
	@for i in $$(seq $(READY_TIMEOUT_S)); do \
		if $(PYTHON) scripts/manage.py --json describe 2>/dev/null | grep -q '"status": "READY"'; then \
			echo "conette is READY: http://127.0.0.1:8080/predictions/conette (inference key in key_file.json)"; \
			exit 0; \
		fi; \
		sleep 1; \
	done; \
	echo "no READY worker after $(READY_TIMEOUT_S) s; see logs/model_log.log" >&2; exit 1

stop: | $(VENV_STAMP)
	$(TORCHSERVE) --stop

test: install
	$(PYTHON) -m pytest

# Latency at concurrency 1 and throughput at concurrency 8, the running server vs the in-process engine.
bench: serve
	$(PYTHON) scripts/bench_model.py --checkpoint $(CHECKPOINT)
	$(PYTHON) scripts/bench_server.py --checkpoint $(CHECKPOINT)

FORCE:
