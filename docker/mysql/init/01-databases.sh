#!/bin/bash
# MLflow's database, granted to the project's user. Runs once, on an empty data directory.
#
# The mysql image's entrypoint has already created MYSQL_DATABASE and MYSQL_USER (with all
# privileges on it) from the environment; this adds MLFLOW_DATABASE for the tracking server.
# The entrypoint sources *.sh files that are not executable (then docker_process_sql is
# defined) and runs the executable ones; both work. No `set -u`: a sourced file shares the
# entrypoint's shell options.

imgpipe_init_sql="CREATE DATABASE IF NOT EXISTS \`${MLFLOW_DATABASE:?MLFLOW_DATABASE is not set}\`
    CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
GRANT ALL PRIVILEGES ON \`${MLFLOW_DATABASE}\`.* TO '${MYSQL_USER:?MYSQL_USER is not set}'@'%';
FLUSH PRIVILEGES;"

if declare -F docker_process_sql >/dev/null; then
    docker_process_sql <<<"$imgpipe_init_sql"
else
    mysql --protocol=socket -uroot -p"${MYSQL_ROOT_PASSWORD}" <<<"$imgpipe_init_sql"
fi
echo "[imgpipe] database ${MLFLOW_DATABASE} ready for ${MYSQL_USER}"
unset imgpipe_init_sql
