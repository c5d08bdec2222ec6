# Thin wrapper: the real work is in cargo and scripts/.
SHELL := /bin/bash
CARGO ?= cargo
MUSL := x86_64-unknown-linux-musl

.PHONY: all deps build agent demo test bench validate clean-demo

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

# The static agent that becomes the initramfs's /init.
agent: deps
	$(CARGO) build --release --target $(MUSL) -p kiln-agent

demo: deps build
	@scripts/demo.sh

validate:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps validate
	$(CARGO) test --workspace --no-fail-fast

bench: deps
	$(CARGO) build --release --workspace
	@for b in scripts/bench-*.sh; do [ -x "$$b" ] || continue; echo "== $$b"; "$$b" || exit 1; done

clean-demo:
	rm -rf demo "$${KILN_DEMO_SERVER:-/run/kiln-demo}"
