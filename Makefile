# make demo  - set up what is missing, start the stack, run sample jobs, print what happened
# make test  - set up what is missing, lint, type-check, run the whole suite against real services
SHELL := /bin/bash
VENV := var/venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: bootstrap services images demo down test lint typecheck unit integration bench clean ops-test bench-scale bench-hostile bench-files bench-capacity

bootstrap:
	@bash scripts/bootstrap.sh

services: bootstrap
	@bash scripts/services.sh start

images: bootstrap
	@bash scripts/base-images.sh

demo: bootstrap images
	@$(BIN)/runner dev up
	@bash scripts/demo.sh

down:
	@$(BIN)/runner dev down

lint: bootstrap
	$(BIN)/ruff check runner api tests migrations bench
typecheck: bootstrap
	$(BIN)/mypy

unit: bootstrap
	$(BIN)/pytest -q tests/unit

integration: services images
	$(BIN)/pytest -q tests/integration

test: services images lint typecheck
	$(BIN)/pytest -q tests/unit tests/integration

clean:
	-$(BIN)/runner dev down
	-bash scripts/services.sh stop

bench: services images
	@$(BIN)/python bench/suite.py

# Scale: list latency at 100,000 runs, worker memory over 1,000 runs, a 1 GB log flood.
bench-scale: services images
	@$(BIN)/python bench/scale.py

# Hostile processors and clients against a real stack: held or not, with the figure.
bench-hostile: services images
	@$(BIN)/python bench/hostile.py

# Files in, files out: upload, download, delivery and reuse, each against its baseline.
bench-files: services images
	@$(BIN)/python bench/files.py

# Capacity by simulation: runs/s and claim latency of one control plane against simulated hosts.
bench-capacity: services
	@$(BIN)/python bench/capacity.py

# docker-compose stack end to end, and every runbook's commands against a real stack.
ops-test: services images
	@bash scripts/ops-test.sh
