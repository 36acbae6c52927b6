#!/usr/bin/env bash
# Install the test environment (scripts/install-test-env.sh), check the import contracts (scripts/lint-imports.sh)
# and run the whole test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-env.sh
VENV=${MISGUARD_TEST_VENV:-.venv-test}
set +e
bash scripts/lint-imports.sh
contracts=$?
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
[ "$contracts" -ne 0 ] && { echo "import contracts broken (see lint-imports above)" >&2; exit 1; }
exit "$rc"
