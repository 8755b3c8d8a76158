# Shortcuts for the README's commands.
.PHONY: serve test bench lint install

serve:
	./scripts/bootstrap.sh && .venv/bin/polarkvd serve

test:
	./scripts/bootstrap.sh --with-sglang && ./scripts/lint.sh && .venv/bin/python -m pytest

bench:
	./scripts/bootstrap.sh && .venv/bin/polarkvd bench datapath

lint:
	./scripts/bootstrap.sh && ./scripts/lint.sh

# System install as a service: see docs/OPERATIONS.md. `make install PREFIX=/usr DESTDIR=/tmp/stage`
PREFIX ?= /usr/local
install:
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" ./scripts/install.sh
