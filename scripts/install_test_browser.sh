#!/usr/bin/env bash
# Chromium and its WebDriver, for the test that drives `dove-vlm serve` in a real browser (Debian packages).
# Does nothing when both are already on PATH; uses sudo only when not run as root.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update
$SUDO apt-get install -y chromium chromium-driver
