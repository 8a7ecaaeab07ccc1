#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its test extras.
# Idempotent: a second call only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=""
# 3.11.4 or newer: archive extraction relies on tarfile's extraction filters (PEP 706).
for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(not ((3, 11, 4) <= sys.version_info[:3] < (3, 12)))'; then
        python="$candidate"; break
    fi
done
if [ -z "$python" ]; then
    echo "error: Python 3.11.4 or newer 3.11 is required (python3.11 or python3 on PATH; 3.11.4 added" \
         "the tarfile extraction filters that dataset archives are unpacked with)" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml.
.venv/bin/python -m pip install --quiet -e '.[dev]'
