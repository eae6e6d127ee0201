#!/usr/bin/env bash
# Set up and run the test suite (unit tests, Ray/DeepSpeed/MLflow/S3 integration tests, the e2e drill).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
python3 -m pytest -q --durations=15 "$@"
