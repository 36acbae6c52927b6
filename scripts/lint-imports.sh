#!/usr/bin/env bash
# Check misguard's import contracts (pyproject.toml, [tool.importlinter]) with import-linter. The folders at the
# root are linked into misguard/ (misguard/core -> ../core, ...), so `lint-imports` run here reads the package as
# it installs. Exit code 1 when a contract is broken. Needs the test environment (scripts/install-test-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MISGUARD_TEST_VENV:-.venv-test}
exec "$VENV/bin/lint-imports"
