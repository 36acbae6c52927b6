#!/usr/bin/env bash
# Install the test environment (scripts/install-test-env.sh) and run the whole test suite. Extra arguments go to
# pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-env.sh
VENV=${MISGUARD_VENV:-.venv}
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
exit "$rc"
