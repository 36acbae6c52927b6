#!/usr/bin/env bash
# Check misguard's import contracts (pyproject.toml, [tool.importlinter]) with import-linter, on the package as it
# installs: the root folders are installed into one temporary `misguard/` tree (the source tree maps them there
# with package-dir, which import-linter cannot follow), then `lint-imports` reads that tree. Exit code 1 when a
# contract is broken. Needs the test environment (scripts/install-test-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MISGUARD_VENV:-.venv}
ROOT=$(pwd)
target=$(mktemp -d)
build=$(mktemp -d)
trap 'rm -rf "$target" "$build"' EXIT
# A copy of the tree builds the package, so no build/ or egg-info is left in the checkout.
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$build"
"$VENV/bin/python" -m pip --isolated --disable-pip-version-check -q install --no-deps --target "$target" "$build"
cd "$target"
"$ROOT/$VENV/bin/lint-imports" "$ROOT/pyproject.toml"
