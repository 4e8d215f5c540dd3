# cube_dispatcher — every target does its own set-up first (scripts/setup is idempotent).
PG_CONFIG  ?= /usr/lib/postgresql/15/bin/pg_config
PGRX_DATA  ?= /tmp/cube-dispatcher-pgrx
E2E_THREADS ?= 3
SUDO_FLAG  := $(if $(filter 0,$(shell id -u)),,--sudo)
SUDO       := $(if $(filter 0,$(shell id -u)),,sudo)
RUNAS      := $(if $(filter 0,$(shell id -u)),--runas postgres --pgdata $(PGRX_DATA)/data,)

.PHONY: all setup build install unit pgrx-test e2e test demo bench clean

all: build

setup:
	@bash scripts/setup

build: setup
	cargo build --release

# Installs into the PostgreSQL 15 found by PG_CONFIG. Stop servers that have the library loaded
# first: the .so is replaced in place.
install: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG) $(SUDO_FLAG)
	@# install scripts of released versions, frozen (pgrx itself installs only the current one and
	@# the upgrade scripts): CREATE EXTENSION ... VERSION '0.1.0' for the upgrade test
	$(SUDO) install -m 644 sql/frozen/*.sql $$($(PG_CONFIG) --sharedir)/extension/

unit: setup
	cargo test --lib

# #[pg_test]s in a cluster cargo-pgrx runs; as root the server runs as postgres.
pgrx-test: setup
	@if [ "$$(id -u)" = 0 ]; then rm -rf $(PGRX_DATA) && mkdir -p $(PGRX_DATA) && chown postgres: $(PGRX_DATA); fi
	cargo pgrx test pg15 $(RUNAS)

# End-to-end scenarios in tests/: each test starts its own throwaway cluster.
e2e: install
	cargo test --release --test '*' -- --test-threads=$(E2E_THREADS)

test: setup
	@bash scripts/run-tests

demo: install
	@bash scripts/demo

bench: install
	@bash scripts/bench $(EVENTS)

clean:
	cargo clean
	rm -rf $(PGRX_DATA)
