# shardflow: `make run` and `make test` set up everything they need.
SHELL := /bin/bash
CARGO ?= cargo
# A target dir outside the clone: CI and fresh clones on the same machine reuse the build.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/shardflow/target
# `make run PROFILE=release` for an optimised build (slower to build the first time).
PROFILE ?= dev
PROFILE_DIR := $(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
CONFIG ?= config/local.toml

.PHONY: all setup build run check test soak bench lint fmt clean-state

all: build

setup:
	@./scripts/setup.sh

build: setup
	$(CARGO) build --profile $(PROFILE) --bin shardflow

## Build and run the embedded default: generator → features → model → stdout and out/.
run: build
	$(CARGO_TARGET_DIR)/$(PROFILE_DIR)/shardflow run --config $(CONFIG)

## Validate every shipped config.
check: build
	@for c in config/*.toml; do $(CARGO_TARGET_DIR)/$(PROFILE_DIR)/shardflow check --config $$c >/dev/null && echo "ok $$c" || exit 1; done

## The whole test suite (unit, property and integration tests), dev profile only.
test: setup
	$(CARGO) test --no-fail-fast

## The reliability tests of `make test`, longer: 20+ SIGKILLs, 30 min of load,
## 50k fuzz cases per property; report, load.csv and rss.png in soak/<time>/.
## SOAK_LOAD_SECS, SOAK_KILLS, SOAK_FUZZ_CASES, SOAK_DIR shorten or lengthen it.
soak: setup
	PROFILE=$(PROFILE) ./scripts/soak.sh

## Criterion benchmarks (release profile).
bench: setup
	$(CARGO) bench

lint: setup
	rustup component add rustfmt clippy >/dev/null 2>&1 || true
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-state:
	rm -rf state out
