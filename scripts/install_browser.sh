#!/usr/bin/env bash
# Chromium for the web demo's browser test (Debian's package; playwright drives it, no browser download).
# Idempotent and quiet: does nothing when a chromium is already on PATH. Needs root (CI runs as root).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no chromium; install Debian's 'chromium' package (as root: apt-get install chromium)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "install_browser: $(chromium --version 2>/dev/null || echo chromium installed)"
