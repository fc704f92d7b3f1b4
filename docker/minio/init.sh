#!/bin/sh
# One-shot `minio-init` service of docker-compose.airflow.yml, run by the root account:
# the buckets, and the pipeline's own MinIO user (AWS_ACCESS_KEY_ID) with a policy limited to
# them. Everything else (Airflow, MLflow, the CLI) uses that user; root stays for administration.
# Idempotent: re-running updates the policy and the user's secret.
set -eu

work_bucket="${PIPELINE_WORK_BUCKET:-$MLFLOW_ARTIFACT_BUCKET}"
mc alias set root http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
for bucket in "$S3_BUCKET" "$MLFLOW_ARTIFACT_BUCKET" "$work_bucket"; do
    mc mb --ignore-existing "root/$bucket"
done

policy=/tmp/imgpipe-pipeline-policy.json
cat >"$policy" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": [
        "arn:aws:s3:::$S3_BUCKET",
        "arn:aws:s3:::$MLFLOW_ARTIFACT_BUCKET",
        "arn:aws:s3:::$work_bucket"
      ]
    },
    {
      "Effect": "Allow",
      "Action": [
        "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
        "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"
      ],
      "Resource": [
        "arn:aws:s3:::$S3_BUCKET/*",
        "arn:aws:s3:::$MLFLOW_ARTIFACT_BUCKET/*",
        "arn:aws:s3:::$work_bucket/*"
      ]
    }
  ]
}
JSON
mc admin policy create root imgpipe-pipeline "$policy"
mc admin user add root "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
# The mc image (ubi-micro) has no grep: the shell matches. Attaching a policy twice fails
# ("already in effect"), and this one-shot job runs again on every `up`.
user_info=$(mc admin user info root "$AWS_ACCESS_KEY_ID")
case "$user_info" in
    *imgpipe-pipeline*) ;;
    *) mc admin policy attach root imgpipe-pipeline --user "$AWS_ACCESS_KEY_ID" ;;
esac
rm -f "$policy"
echo "[minio-init] buckets $S3_BUCKET $MLFLOW_ARTIFACT_BUCKET $work_bucket; user $AWS_ACCESS_KEY_ID limited to them"
