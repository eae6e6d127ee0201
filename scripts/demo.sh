#!/usr/bin/env bash
# Set up, write the bundled demo data, and run the whole pipeline on it (embedded Ray + local MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
python3 -m dino_ray.demo_data outputs/demo-data
# One line per stage event and a live progress line; it ends with the results and where to look.
# Pass --verbose for everything (Ray's and the workers' logs, progress bars).
dino-ray run jobs/pipeline.yaml "$@"
