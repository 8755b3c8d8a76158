# Shortcuts for the README's commands.
.PHONY: serve test bench lint

serve:
	./scripts/bootstrap.sh && .venv/bin/polarkvd serve

test:
	./scripts/bootstrap.sh --with-vllm && .venv/bin/python -m pytest

bench:
	./scripts/bootstrap.sh && .venv/bin/polarkvd bench datapath

lint:
	.venv/bin/ruff check polarkvd tests && .venv/bin/ruff format --check polarkvd tests
