# Shortcuts for the README's commands.
.PHONY: serve test bench lint install

serve:
	./scripts/bootstrap.sh && .venv/bin/polarkvd serve

test:
	./scripts/bootstrap.sh --with-vllm && .venv/bin/python -m pytest

bench:
	./scripts/bootstrap.sh && .venv/bin/polarkvd bench datapath

lint:
	.venv/bin/ruff check polarkvd tests && .venv/bin/ruff format --check polarkvd tests

# System install as a service: see docs/OPERATIONS.md. `make install PREFIX=/usr DESTDIR=/tmp/stage`
PREFIX ?= /usr/local
install:
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" ./scripts/install.sh
