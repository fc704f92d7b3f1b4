#!/bin/bash
# One-shot `check-secrets` service of docker-compose.airflow.yml: refuses to let the stack start
# with the placeholder secrets of .env.example, an empty or malformed Fernet key, a pipeline
# MinIO account that is the root account, or a secret that would break the JSON of an
# AIRFLOW_CONN_* variable. Every problem is listed, each naming its variable in .env.
# (An unset or empty required variable never gets here: `${VAR:?...}` stops `docker compose up`.)
set -u

SECRETS=(
    MINIO_ROOT_USER MINIO_ROOT_PASSWORD AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    MYSQL_PASSWORD AIRFLOW_POSTGRES_PASSWORD AIRFLOW_JWT_SECRET AIRFLOW_SECRET_KEY
    AIRFLOW_FERNET_KEY AIRFLOW_ADMIN_PASSWORD MLFLOW_TRACKING_PASSWORD
    MLFLOW_FLASK_SERVER_SECRET_KEY
)
# Interpolated into the JSON of AIRFLOW_CONN_IMGPIPE_S3 / AIRFLOW_CONN_IMGPIPE_MYSQL.
IN_JSON=(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY MYSQL_USER MYSQL_PASSWORD MYSQL_DATABASE)

problems=()
for name in "${SECRETS[@]}"; do
    value="${!name-}"
    if [ -z "$value" ]; then
        problems+=("$name is empty")
    elif [[ "$value" == *change-me* ]]; then
        problems+=("$name still holds the .env.example placeholder ($value)")
    fi
done
for name in "${IN_JSON[@]}"; do
    value="${!name-}"
    if [[ "$value" == *'"'* || "$value" == *'\'* ]]; then
        problems+=("$name contains \" or \\ (it is written into an AIRFLOW_CONN_* JSON value)")
    fi
done
# Written unquoted into Airflow's PostgreSQL URL.
if [ -n "${AIRFLOW_POSTGRES_PASSWORD-}" ] && ! [[ "$AIRFLOW_POSTGRES_PASSWORD" =~ ^[A-Za-z0-9._~-]+$ ]]; then
    problems+=("AIRFLOW_POSTGRES_PASSWORD may hold only A-Z a-z 0-9 . _ ~ - (it is part of a URL)")
fi
if [ -n "${AIRFLOW_FERNET_KEY-}" ] && ! [[ "$AIRFLOW_FERNET_KEY" =~ ^[A-Za-z0-9_-]{43}=$ ]]; then
    problems+=("AIRFLOW_FERNET_KEY is not a Fernet key (44 characters of URL-safe base64)")
fi
if [ "${AWS_ACCESS_KEY_ID-}" = "${MINIO_ROOT_USER-}" ]; then
    problems+=("AWS_ACCESS_KEY_ID (the pipeline's MinIO user) must differ from MINIO_ROOT_USER")
fi
if [ "${AWS_SECRET_ACCESS_KEY-}" = "${MINIO_ROOT_PASSWORD-}" ]; then
    problems+=("AWS_SECRET_ACCESS_KEY must differ from MINIO_ROOT_PASSWORD")
fi
root_password="${MINIO_ROOT_PASSWORD-}" pipeline_secret="${AWS_SECRET_ACCESS_KEY-}"
if [ ${#root_password} -lt 8 ] || [ ${#pipeline_secret} -lt 8 ]; then
    problems+=("MINIO_ROOT_PASSWORD and AWS_SECRET_ACCESS_KEY need 8 characters or more (MinIO)")
fi

mlflow_password="${MLFLOW_TRACKING_PASSWORD-}"
if [ ${#mlflow_password} -lt 12 ]; then
    problems+=("MLFLOW_TRACKING_PASSWORD needs 12 characters or more (MLflow refuses a shorter admin password)")
fi
mlflow_key="${MLFLOW_FLASK_SERVER_SECRET_KEY-}"
if [ ${#mlflow_key} -lt 32 ]; then
    problems+=("MLFLOW_FLASK_SERVER_SECRET_KEY needs 32 characters or more")
fi

if [ ${#problems[@]} -gt 0 ]; then
    echo "[check-secrets] refusing to start; fix these in .env:" >&2
    for problem in "${problems[@]}"; do
        echo "  - $problem" >&2
    done
    echo "[check-secrets] a Fernet key: python -c \"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())\"" >&2
    echo "[check-secrets] other secrets: openssl rand -hex 32" >&2
    exit 1
fi
echo "[check-secrets] ok: no placeholder, Fernet key set, pipeline MinIO user is not root"
