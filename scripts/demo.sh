#!/usr/bin/env bash
# Set up, write the bundled demo data, and run the whole pipeline on it (embedded Ray + local MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
python3 -m dino_ray.demo_data outputs/demo-data
dino-ray run jobs/pipeline.yaml "$@"
echo "Open the results: mlflow ui --backend-store-uri sqlite:///mlflow.db  (then http://127.0.0.1:5000)"
