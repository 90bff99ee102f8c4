#!/bin/sh
# Start MLflow's tracking server: PostgreSQL backend store, S3 artifacts proxied by the server
# (--serve-artifacts: clients need only the tracking URI and their MLflow credentials, never the bucket's),
# MLflow's basic-auth app, and the Host headers other containers use to reach it by service name.
#
# Everything comes from the environment; nothing secret is written into a URI or a file:
#   MLFLOW_BACKEND_STORE_URI       postgresql://USER@HOST:5432/DB          (no password in it)
#   MLFLOW_AUTH_DATABASE_URI       postgresql://USER@HOST:5432/AUTH_DB     (users and permissions)
#   PGPASSWORD                     the PostgreSQL password (libpq reads it for both URIs)
#   MLFLOW_ARTIFACTS_DESTINATION   s3://BUCKET/PREFIX
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL (for an S3-compatible store)
#   MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD   the admin MLflow creates on first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY the auth app's session/CSRF key
#   MLFLOW_SERVER_ALLOWED_HOSTS    Host headers accepted (default: the service name and loopback)
#   MLFLOW_HOST, MLFLOW_PORT       where it listens (default 0.0.0.0:5000, inside its container)
#   MLFLOW_AUTH_DEFAULT_PERMISSION what a user gets on others' experiments (default NO_PERMISSIONS)
# Extra arguments are passed to `mlflow server` (e.g. --workers 2).
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://user@host:5432/db)}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (postgresql://user@host:5432/auth_db)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (the admin user MLflow creates)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (a long random string)}"

for uri in "$MLFLOW_BACKEND_STORE_URI" "$MLFLOW_AUTH_DATABASE_URI"; do
    if printf '%s' "$uri" | grep -Eq '^[A-Za-z0-9+.-]+://[^/@]*:[^/@]*@'; then
        echo "a database URI carries a password: pass it as PGPASSWORD instead" >&2
        exit 2
    fi
done

# The auth app reads its settings from an INI file (MLFLOW_AUTH_CONFIG_PATH); the admin's name and password
# it takes from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, so the file holds no secret.
config_dir=$(mktemp -d)
cat > "$config_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"

exec mlflow server \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
    --allowed-hosts "${MLFLOW_SERVER_ALLOWED_HOSTS:-mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*}" \
    --app-name basic-auth \
    "$@"
