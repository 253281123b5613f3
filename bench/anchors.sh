#!/usr/bin/env bash
# Build bench/.venv-anchors: the tools we compare against (Cockpit, BackPACK, PyHessian), kept out of
# the main venv because Cockpit imports pkg_resources (needs setuptools<70) and PyHessian pins nothing.
# torch is held at the development pin so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv-anchors
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c 'import cockpit, backpack, pyhessian, sklearn' 2>/dev/null; then
  printf 'torch==2.13.0\n' > "$VENV/constraints.txt"
  "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" torch==2.13.0 numpy scikit-learn \
      backpack-for-pytorch==1.7.1 cockpit-for-pytorch==1.0.2 pyhessian==0.1
  # Cockpit imports pkg_resources, removed in setuptools 70 (torch's metadata asks for newer; harmless here).
  "$VENV/bin/pip" install -q "setuptools<70" 2>/dev/null || true
fi
"$VENV/bin/pip" install -q --no-deps -e .. >/dev/null
"$VENV/bin/python" -c 'import cockpit, backpack, pyhessian, torch; print("anchors ready, torch", torch.__version__)'
