#!/usr/bin/env bash
# Set up, then regenerate the full default matrix (embedded data, offline):
# datasets -> features -> training -> evaluation -> results/benchmark.duckdb -> reports/leaderboard.html
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nagl run "$@"
