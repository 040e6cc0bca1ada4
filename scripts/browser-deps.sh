#!/usr/bin/env bash
# Install Debian's chromium for the dashboard's headless-browser test (tests/test_dashboard_browser.py).
# Usage: bash scripts/browser-deps.sh   (as root; does nothing if chromium is already there).
# Prints the browser's path on success; exits 1 with a reason when it cannot be installed
# (not root, no apt-get, no package): the test then skips with that reason.
set -u
for exe in chromium chromium-browser; do
    if command -v "$exe" >/dev/null 2>&1; then
        command -v "$exe"
        exit 0
    fi
done
if [ "$(id -u)" != 0 ]; then
    echo "chromium is not installed and this is not root (run: apt-get install -y chromium)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is not installed and there is no apt-get here" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
fi
if ! apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1; then
    echo "apt-get install chromium failed" >&2
    exit 1
fi
command -v chromium
