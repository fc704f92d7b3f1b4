#!/usr/bin/env bash
# make demo: render a real dataset, load it into the bucket, run the whole DAG once, show results.
# Runs inside `scripts/stack.py run` (the .env and Airflow environment are set).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=.local/demo
CONF=${DEMO_CONF:-'{}'}

echo "[demo] 1/4 rendering scikit-learn's handwritten digits to image files in $DEMO_DIR"
python -m pipeline demo-data "$DEMO_DIR"

echo "[demo] 2/4 uploading to s3://$S3_BUCKET/$S3_PREFIX (unchanged files are skipped)"
python -m pipeline upload "$DEMO_DIR" --prefix "$S3_PREFIX"

echo "[demo] 3/4 running the DAG image_classification once (airflow dags test), conf: $CONF"
started=$(date +%s)
airflow dags test image_classification -c "$CONF" > .local/logs/demo-dag.log 2>&1 || {
  echo "[demo] the DAG run failed; last lines of .local/logs/demo-dag.log:"; tail -40 .local/logs/demo-dag.log; exit 1; }
grep -E "state=|Marking task|finished|failed" .local/logs/demo-dag.log | grep -vi "debug" | tail -15 || true
echo "[demo] DAG run finished in $(( $(date +%s) - started ))s (log: .local/logs/demo-dag.log)"

echo "[demo] 4/4 results"
python scripts/demo_summary.py
