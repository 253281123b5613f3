#!/usr/bin/env bash
# Install Debian's Chromium for the report's browser test (tests/report/browser_test.py), unless one is there.
# The test drives it over the DevTools pipe with the standard library: no Python package is needed.
set -euo pipefail
if [ -n "${STEPAUDIT_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -o Dpkg::Use-Pty=0 chromium >/dev/null
command -v chromium
