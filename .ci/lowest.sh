#!/usr/bin/env bash
# The lowest versions pyproject.toml admits (constraints-lowest.txt), in a fresh virtual
# environment, on the tests that exercise jax, flax, optax, orbax and grain.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --prefer-binary \
  --constraint constraints-lowest.txt -e ".[dev]"
"$venv/bin/python" -m pip list 2>/dev/null | grep -E '^(jax|jaxlib|flax|optax|orbax-checkpoint|grain) '
"$venv/bin/python" -m pytest -m "not slow" tests/test_models.py tests/test_blocks.py \
  tests/test_derivative.py tests/test_training.py tests/test_data.py
