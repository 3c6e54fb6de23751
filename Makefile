# agent-orchestrator — `make run` starts the system on this machine, `make test` runs the
# whole suite. Both install what they need when it is missing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# Builds live outside the clone so that fresh clones on the same machine reuse them.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/agent-orchestrator/target
PYTHON ?= python3
# Python packages the tests use (pinned: the infra tests rely on python-hcl2 8's output).
PY_TEST_PACKAGES := 'moto[server]==5.2.1' python-hcl2==8.1.4 pytest==9.2.0 pyyaml==6.0.3 schemathesis==4.32.5

.PHONY: help run test test-fast test-rust test-infra build lint bench deps-run deps-test

help:
	@echo "make run    start a coordinator and a worker for every capability (SQLite, no cloud)"
	@echo "make test   install test dependencies when missing and run the whole suite"
	@echo "make test-fast  unit and in-process tests only (Rust alone; no sandbox, no moto)"
	@echo "make lint   cargo fmt --check and clippy -D warnings"
	@echo "make bench  orchestration overhead, warm workers, chaos and AWS API-call benchmarks"

deps-run:
	@scripts/install-deps.sh run
	@scripts/install-bwrap.sh

deps-test:
	@scripts/install-deps.sh test
	@scripts/install-bwrap.sh
	@{ command -v moto_server >/dev/null && $(PYTHON) -c 'import hcl2, pytest, yaml, moto, schemathesis' 2>/dev/null; } || \
		$(PYTHON) -m pip install --quiet $(PY_TEST_PACKAGES)

build:
	cargo build --workspace --all-targets

run: deps-run
	cargo build --release --bins
	@scripts/run-local.sh

test: deps-test build test-rust test-infra

# The fast tier: every crate's unit tests and the tests that run the coordinator in-process.
# No external process, peer or installed tool is needed.
# (--workspace keeps one feature set, so the tiers share their builds.)
FAST_TESTS := --test conformance_sqlite --test proptest_message --test proptest_stream_json \
	--test inproc_supervisor --test github_webhooks

test-fast:
	cargo test --workspace --lib --bins
	cargo test --workspace $(FAST_TESTS)

test-rust:
	cargo test --workspace --no-fail-fast

test-infra:
	AO_COORDINATOR_BIN=$(CARGO_TARGET_DIR)/debug/coordinator AO_REQUIRE_RESOURCE_NAMES=1 \
		$(PYTHON) -m pytest tests/infra -q

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench: deps-test
	cargo build --release --bins
	cargo bench -p ao-tests --bench pipeline
	cargo bench -p ao-tests --bench load
	cargo bench -p ao-tests --bench sandbox
	cargo bench -p ao-tests --bench warm
	cargo bench -p ao-tests --bench chaos
	cargo bench -p ao-tests --bench parallel_plan
	cargo bench --profile dev -p ao-shared --bench aws_calls
