#!/usr/bin/env bash
# Set up, then run the test suite. The report's browser test needs Debian's
# chromium: installed here when missing and possible (root + apt), else that one
# test is skipped with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ||
        echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
# pytest exits 5 when it collects no test: that fails this script too.
exec .venv/bin/python -m pytest "$@"
