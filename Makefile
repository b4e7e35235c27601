# Köpür — developer entry points. `make` alone lists them.
#   make run                 everything on this machine (Ctrl-C stops; data kept in .data)
#   make run-federation      two countries (ru, kg) linked by a NATS leaf node (data in .data-federation)
#   make test ARGS='...'     fmt check, clippy, tests on a private PostgreSQL + NATS
# The scripts live in scripts/; they install what is missing (scripts/deps.sh).

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Extra arguments for `cargo test --workspace` (make test) or scripts/bench.sh (make bench).
ARGS ?=

.PHONY: help run run-federation test test-faults bench lint fmt reset reset-federation stack-up stack-down stack-status

help:
	@echo "Köpür — make targets:"
	@echo "  make run           build (release), start PostgreSQL + NATS in .data and the services; Ctrl-C stops"
	@echo "  make run-federation  two countries on this machine: ru (destination) and kg (home), each with its own"
	@echo "                     NATS server (kg a leaf node of ru over TLS) and databases, in .data-federation; Ctrl-C stops"
	@echo "  make test          cargo fmt --check, clippy -D warnings, cargo test on a private stack (ARGS='...' for cargo test)"
	@echo "  make test-faults   the full fault suite: 10,000+ commands through 20+ kills and restarts (minutes)"
	@echo "  make bench         scripts/bench.sh (ARGS='...')"
	@echo "  make lint          cargo fmt --check and cargo clippy -D warnings"
	@echo "  make fmt           cargo fmt --all"
	@echo "  make reset         delete everything in .data (databases, streams, keys, logs), and as root its cluster under /var/lib/kopur; make run must be stopped"
	@echo "  make reset-federation  delete everything in .data-federation (both countries' data, keys, TLS); stop it first"
	@echo "  make stack-up      start only PostgreSQL + NATS in .data (prints the URLs)"
	@echo "  make stack-down    stop them (data kept)"
	@echo "  make stack-status  what runs in .data"

run:
	bash scripts/run.sh

run-federation:
	bash scripts/federation.sh

test:
	bash scripts/test.sh $(ARGS)

test-faults:
	bash scripts/test-faults.sh $(ARGS)

bench:
	bash scripts/bench.sh $(ARGS)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

reset:
	@if [ -e .data/run.lock ] && ! flock -n .data/run.lock true; then \
		echo "make run is still running on .data: stop it (Ctrl-C) first" >&2; exit 1; \
	fi
	bash scripts/stack.sh reset .data

reset-federation:
	@if [ -e .data-federation/run.lock ] && ! flock -n .data-federation/run.lock true; then \
		echo "make run-federation is still running on .data-federation: stop it (Ctrl-C) first" >&2; exit 1; \
	fi
	@for part in kg ru db; do \
		if [ -d .data-federation/$$part ]; then bash scripts/stack.sh reset .data-federation/$$part || exit 1; fi; \
	done
	rm -rf .data-federation

stack-up:
	bash scripts/stack.sh up .data

stack-down:
	bash scripts/stack.sh down .data

stack-status:
	@bash scripts/stack.sh status .data || true
