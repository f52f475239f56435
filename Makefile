# `make` (or `make help`) prints the "## " lines below and each target's "## " description.
## conette-serve: CoNeTTE audio captioning on TorchServe.
##
## CHECKPOINT=dir: a folder in the official format (config.json + pytorch_model.bin) or the serving format
## (config.json + model.safetensors + vocab.json); default: the official weights fetched into weights/conette.
## Addresses and ports are config.properties' (8080 inference, 8081 management, 8082 metrics by default).
## Every step is skipped when its outputs are newer than its inputs. The user commands are in docs/commands.md.
##

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PYTHON := $(VENV)/bin/python
TORCHSERVE := $(VENV)/bin/torchserve
VENV_STAMP := $(VENV)/.installed
# The KServe SDK, for the real-client tests only, in a virtualenv of its own (requirements-kserve.txt says why).
KSERVE_VENV := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed
DEFAULT_CHECKPOINT := weights/conette
CHECKPOINT ?= $(DEFAULT_CHECKPOINT)
MODEL_STORE := model_store
MAR := $(MODEL_STORE)/conette.mar
MAR_DIR := $(MODEL_STORE)/conette
# Records which checkpoint the archive was built from, so a different CHECKPOINT= rebuilds it.
CHECKPOINT_RECORD := build/checkpoint-path
READY_TIMEOUT_S ?= 300
TS_PID_FILE := $(or $(TEMP),$(TMPDIR),/tmp)/.model_server.pid
TS_CONFIG := config.properties
# This checkout's packages first: a virtualenv shared by several checkouts may have another one installed.
CHECKOUT_PYTHON := PYTHONPATH=$(CURDIR)/client:$(CURDIR)/handler$(if $(PYTHONPATH),:$(PYTHONPATH)) $(PYTHON)

MAR_INPUTS := handler/conette_handler.py handler/model-config.yaml scripts/build_mar.sh handler/conette_engine/VERSION \
	$(wildcard handler/conette_engine/*.py handler/conette_engine/data/*) $(wildcard handler/conette_protocol/*.py) \
	$(wildcard $(addprefix $(CHECKPOINT)/,config.json pytorch_model.bin model.safetensors vocab.json)) \
	$(if $(filter $(DEFAULT_CHECKPOINT),$(CHECKPOINT)),$(DEFAULT_CHECKPOINT)/pytorch_model.bin) \
	$(CHECKPOINT_RECORD)
# Debian packages: FFmpeg decodes the audio, Java 17 runs TorchServe's frontend, SoX and espeak-ng make test audio.
APT_PACKAGES := ffmpeg sox espeak-ng
APT := $(if $(filter 0,$(shell id -u)),,sudo) apt-get

.PHONY: help install system-packages weights mar mar-dir serve stop test bench FORCE

help: ## this list
	@awk -F ':.*## ' '/^## ?/ { sub(/^## ?/, ""); print; next } /^[a-z-]+:.*## / { printf "  make %-16s %s\n", $$1, $$2 }' \
		$(firstword $(MAKEFILE_LIST))

install: system-packages $(VENV_STAMP) $(KSERVE_STAMP) ## Debian packages (FFmpeg, SoX, espeak-ng, Java 17), the virtualenvs, this project (editable)

system-packages: ## only the Debian packages
	@missing="$$(for tool in $(APT_PACKAGES); do command -v $$tool >/dev/null || echo $$tool; done)"; \
	command -v java >/dev/null || missing="$$missing default-jre-headless"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(APT) update -q && DEBIAN_FRONTEND=noninteractive $(APT) install -y -q --no-install-recommends $$missing; \
	fi

# The pinned lists first, then the project itself (its dependencies are requirements.txt, already installed):
# editable, so that the conette-* commands run this checkout's code; no build isolation, so no download.
$(VENV_STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(KSERVE_STAMP): requirements-kserve.txt
	test -x $(KSERVE_VENV)/bin/python || python3 -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q -r requirements-kserve.txt
	touch $@

weights: $(DEFAULT_CHECKPOINT)/pytorch_model.bin ## fetch and verify the official checkpoint into weights/conette

$(DEFAULT_CHECKPOINT)/pytorch_model.bin: | $(VENV_STAMP)
	$(CHECKOUT_PYTHON) -m conette_client.fetch_weights --out $(DEFAULT_CHECKPOINT)

$(CHECKPOINT_RECORD): FORCE
	@mkdir -p $(dir $@)
	@echo "$(abspath $(CHECKPOINT))" | cmp -s - $@ || echo "$(abspath $(CHECKPOINT))" > $@

mar: $(MAR) ## build model_store/conette.mar from CHECKPOINT

$(MAR): $(MAR_INPUTS) | $(VENV_STAMP)
	PYTHON=$(PYTHON) scripts/build_mar.sh $(CHECKPOINT) $(MODEL_STORE)

mar-dir: $(MAR_DIR)/MAR-INF/MANIFEST.json ## the unpacked model directory model_store/conette/, for volume mounts

$(MAR_DIR)/MAR-INF/MANIFEST.json: $(MAR_INPUTS) | $(VENV_STAMP)
	PYTHON=$(PYTHON) scripts/build_mar.sh $(CHECKPOINT) $(MODEL_STORE) --no-archive

# Started from the repository root: config.properties' relative paths, logs/ and key_file.json live here.
serve: system-packages $(MAR) ## set up everything, build the .mar, start TorchServe in the background, wait for a READY worker
	@if [ -f $(TS_PID_FILE) ] && kill -0 "$$(cat $(TS_PID_FILE))" 2>/dev/null; then \
		echo "TorchServe is already running (make stop, then make serve, to restart it)"; \
	else \
		mkdir -p logs; $(TORCHSERVE) --start --ncs --ts-config $(TS_CONFIG) > logs/start.txt 2>&1 \
			|| { cat logs/start.txt; exit 1; }; \
	fi
	@echo "waiting for a READY worker (logs in logs/)..."
	@$(CHECKOUT_PYTHON) -m conette_client.manage --config $(TS_CONFIG) --timeout $(READY_TIMEOUT_S) wait-ready \
		|| { echo "see logs/model_log.log" >&2; exit 1; }

stop: | $(VENV_STAMP) ## stop the TorchServe that make serve started
	$(TORCHSERVE) --stop

test: install ## the whole test suite (it starts its own TorchServe on free ports, 18080-18082 when free)
	CONETTE_KSERVE_PYTHON=$(abspath $(KSERVE_VENV)/bin/python) $(PYTHON) -m pytest

bench: serve ## engine stages and GFLOP/s, then the running server vs the in-process engine (latency, throughput)
	$(CHECKOUT_PYTHON) tools/bench_model.py --checkpoint $(CHECKPOINT)
	$(CHECKOUT_PYTHON) tools/bench_server.py --checkpoint $(CHECKPOINT)

FORCE:
