-- Run once, when the postgres service initialises an empty data volume. POSTGRES_DB (mlflow) holds the MLflow
-- tracking store; the sweeps' claims and the Optuna studies get a database of their own, because MLflow and Optuna
-- both keep an `alembic_version` table and must not share one.
CREATE DATABASE experiments;
