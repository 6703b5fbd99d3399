#!/usr/bin/env bash
# "From laptop to cluster" on one machine, without Docker: PostgreSQL, S3-compatible storage (moto's server), an
# MLflow server with S3 artifacts, a Dask scheduler and two workers on 127.0.0.1; then datasets generated on Dask, a
# sweep, an Optuna study and a report, all tracked on the server. Run it from the repository with the venv active:
#     bash docs/cluster-walkthrough.sh
# Needs a PostgreSQL server (Debian/Ubuntu: apt install postgresql) and moto's S3 server, for trying this out (in the
# venv of `make setup`; else pip install moto flask-cors py-partiql-parser); use MinIO or S3 for real work. On a
# cluster, run each service on its own machine with its host name for 127.0.0.1. Every setting below can be given as an environment variable; the services keep running afterwards
# (KEEP_SERVICES=0 stops them) and are stopped if a step fails. README.md shows this file verbatim.
set -euo pipefail

: "${WORK:=$PWD/cluster-walkthrough}"      # data, definitions, logs and reports (shared by every worker)
: "${HOST:=127.0.0.1}"                     # where the services listen
: "${PG_ADMIN:=sudo -u postgres psql}"     # psql as a PostgreSQL superuser (to create the user and databases)
: "${PGHOST:=$HOST}" "${PGPORT:=5432}"     # the PostgreSQL server the platform and MLflow use
: "${DB_USER:=hrtem}" "${DB_PASSWORD:=change-me}"
: "${EXPERIMENTS_DB:=experiments}" "${MLFLOW_DB:=mlflow}"
: "${S3_PORT:=9000}" "${BUCKET:=hrtem-mlflow}"
: "${MLFLOW_PORT:=5000}" "${MLFLOW_WORKERS:=2}"
: "${DASK_PORT:=8786}" "${DASK_DASHBOARD_PORT:=8787}"
: "${N_TRAIN:=32}" "${N_BENCH:=16}" "${EPOCHS:=2}" "${STEPS:=10}" "${SEEDS:=[0, 1]}" "${TRIALS:=4}"
: "${KEEP_SERVICES:=1}"

mkdir -p "$WORK" && cd "$WORK"
started=()
stop_services() { [ ${#started[@]} -eq 0 ] || kill "${started[@]}" 2>/dev/null || true; }
trap 'status=$?; if [ $status -ne 0 ] || [ "$KEEP_SERVICES" != 1 ]; then stop_services; fi' EXIT
wait_for() {  # wait_for ADDRESS LOG [N]: the service started last answers there (a Dask scheduler: with N workers)
  python - "$@" "${started[-1]}" <<'PY'
import os, sys, time, urllib.request
address, log, pid, deadline = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[-1]), time.monotonic() + 120
while True:
    try:
        if address.startswith("tcp://"):
            from distributed import Client
            with Client(address, timeout=5) as client:
                if int(sys.argv[3]):
                    client.wait_for_workers(int(sys.argv[3]), timeout=5)
        else:
            urllib.request.urlopen(address, timeout=5)
        break
    except OSError as exc:  # refused, or a timeout
        problem = exc
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"error: the service for {address} has exited: see {log}")
    if time.monotonic() > deadline:
        sys.exit(f"error: {address} does not answer after two minutes ({problem}): see {log}")
    time.sleep(0.5)
PY
}

# 1. PostgreSQL: a user with a password, and two databases it owns: the sweep claims and Optuna studies
#    ("experiments"), and MLflow's own ("mlflow"; MLflow and Optuna each keep an alembic_version table).
$PG_ADMIN -v ON_ERROR_STOP=1 -q <<SQL
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', '$DB_USER', '$DB_PASSWORD')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', db, '$DB_USER') FROM unnest(ARRAY['$EXPERIMENTS_DB', '$MLFLOW_DB']) db
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = db) \gexec
SQL
# libpq reads the password from PGPASSWORD (or ~/.pgpass): every process that connects needs it, the MLflow server
# and each Dask worker included; keep it out of the URLs.
export PGHOST PGPORT PGPASSWORD="$DB_PASSWORD"
STORAGE="postgresql://$DB_USER@$PGHOST:$PGPORT/$EXPERIMENTS_DB"

# 2. S3-compatible storage and the bucket for MLflow's artifacts (the usual AWS variables name the endpoint and keys;
#    moto accepts any keys, MinIO or S3 want real ones).
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-walkthrough}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-walkthrough}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://$HOST:$S3_PORT}"
moto_server -H "$HOST" -p "$S3_PORT" > s3.log 2>&1 & started+=($!)
wait_for "$AWS_ENDPOINT_URL" s3.log
python -m hrtem_core.buckets create "s3://$BUCKET"

# 3. The MLflow server: runs in PostgreSQL, artifacts proxied to the bucket, so only the server holds S3 keys (it needs
#    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL for non-AWS S3, and PGPASSWORD). --allowed-hosts
#    replaces MLflow's defaults (localhost and private addresses): list every HOST:PORT clients will use.
MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL" mlflow server \
    --backend-store-uri "postgresql+psycopg://$DB_USER@$PGHOST:$PGPORT/$MLFLOW_DB" \
    --artifacts-destination "s3://$BUCKET/mlflow" --host "$HOST" --port "$MLFLOW_PORT" \
    --allowed-hosts "$HOST:$MLFLOW_PORT,localhost:$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
    > mlflow.log 2>&1 & started+=($!)
wait_for "http://$HOST:$MLFLOW_PORT/health" mlflow.log
export MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT"   # or --tracking-uri on every command

# 4. Dask: a scheduler, and workers started from the same working directory (a shared filesystem), with the same venv
#    and PGPASSWORD in their environment (a worker without it cannot open the sweep's claims).
dask scheduler --host "$HOST" --port "$DASK_PORT" --dashboard-address "$HOST:$DASK_DASHBOARD_PORT" \
    > dask-scheduler.log 2>&1 & started+=($!)
SCHEDULER="tcp://$HOST:$DASK_PORT"
wait_for "$SCHEDULER" dask-scheduler.log 0
dask worker "$SCHEDULER" --nworkers 2 --nthreads 1 > dask-workers.log 2>&1 & started+=($!)
wait_for "$SCHEDULER" dask-workers.log 2

# 5. Two datasets, generated as Dask tasks (the same content hash as a local run), both at once
python -m datagen generate --recipe tiny --n "$N_TRAIN" --seed 1 --out data/train --scheduler "$SCHEDULER" --quiet &
train=$!
python -m datagen generate --recipe tiny --n "$N_BENCH" --seed 2 --out data/low-dose --set imaging.dose_e_per_A2=100 \
    --scheduler "$SCHEDULER" --quiet &
bench=$!
wait "$train"
wait "$bench"

# 6. A base training config, a sweep (2 subsets x SEEDS) and a study (TRIALS trials) over it
cat > base.yaml <<YAML
seed: 0
epochs: $EPOCHS
data: {train: [{path: data/train}], val_fraction: 0.25, crop_px: 64, batch_size: 4, steps_per_epoch: $STEPS}
benchmarks: [{name: low-dose, path: data/low-dose}]
model: {preset: compact}
tracking: {experiment: walkthrough, n_prediction_images: 0, system_metrics: false}
YAML
cat > sweep.yaml <<YAML
kind: sweep
name: walkthrough
base: base.yaml
subsets:
  - {name: all, set: {}}
  - {name: near-focus, set: {data.train.0.filter: "abs(imaging.defocus_A) <= 300"}}
seeds: $SEEDS
YAML
cat > study.yaml <<YAML
kind: study
name: walkthrough
base: base.yaml
search_space:
  optim.lr: {type: float, low: 0.0003, high: 0.01, log: true}
n_trials: $TRIALS
pruner: {kind: none}
YAML

# 7. The sweep and the study, one worker per Dask worker, claims and trials in PostgreSQL; then the sweep's report
python -m experiments sweep --config sweep.yaml --storage "$STORAGE" --scheduler "$SCHEDULER" --quiet
python -m experiments study --config study.yaml --storage "$STORAGE" --scheduler "$SCHEDULER" --quiet
python -m experiments report --sweep walkthrough --out reports/walkthrough
echo "report: $WORK/reports/walkthrough/index.html; MLflow UI: $MLFLOW_TRACKING_URI"
if [ "$KEEP_SERVICES" = 1 ]; then echo "the services keep running; stop them with: kill ${started[*]}"; fi
