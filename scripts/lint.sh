#!/usr/bin/env bash
# The project's static checks, as `make lint` and CI run them (after ./scripts/bootstrap.sh):
# style (ruff), the import layers (lint-imports, contracts in pyproject.toml), types (mypy).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[lint] ruff"
.venv/bin/ruff check polarkvd tests
.venv/bin/ruff format --check polarkvd tests
echo "[lint] import contracts"
.venv/bin/lint-imports
echo "[lint] mypy"
.venv/bin/mypy
