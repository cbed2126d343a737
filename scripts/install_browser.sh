#!/bin/sh
# Install Chromium for the headless-browser test of the HTML report (tests/test_html_report.py).
# Debian/Ubuntu (apt-get). Idempotent and quiet: does nothing when `chromium` is already on PATH.
set -eu

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no apt-get here; install Chromium with your package manager so that 'chromium' is on PATH" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_browser.sh: run as root or install sudo (needed for apt-get install chromium)" >&2
        exit 1
    fi
fi
# fonts-dejavu-core: a slim image has no fonts, and the report's screenshots would show empty boxes.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
if ! command -v chromium >/dev/null 2>&1; then
    echo "install_browser.sh: apt-get installed chromium but it is not on PATH" >&2
    exit 1
fi
echo "installed $(chromium --version 2>/dev/null || echo chromium)"
