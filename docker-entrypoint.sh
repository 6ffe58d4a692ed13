#!/bin/sh
# Prepares the Image Service's environment, then replaces itself with the command ("$@").
#
# 1. Secrets: the files redis_password, openai_api_key and jwt_secret in $SECRETS_DIR become
#    REDIS_PASSWORD, OPENAI_API_KEY and JWT_SECRET (surrounding whitespace stripped). A file wins
#    over the variable, as in app.py; a missing or blank file leaves the variable as it is.
# 2. Redis: when Redis is configured (REDIS_URL, else REDIS_HOST/REDIS_PORT), waits until it
#    accepts TCP connections, so the first readiness probe does not fail for nothing.
# 3. exec "$@": the command takes this process over, so tini's signals reach gunicorn directly.
#
# Settings: SECRETS_DIR (/run/secrets), REQUIRED_SECRETS ("jwt_secret openai_api_key"; empty
# requires none), SECRETS_WAIT_SECONDS (30), REDIS_WAIT_SECONDS (30). A wait that runs out exits 1
# and names what was missing. Log lines go to stderr; no secret value is ever printed, not even
# under `sh -x`.
set -eu

SECRETS_DIR=${SECRETS_DIR:-/run/secrets}
REQUIRED_SECRETS=${REQUIRED_SECRETS-jwt_secret openai_api_key}
SECRETS_WAIT_SECONDS=${SECRETS_WAIT_SECONDS:-30}
REDIS_WAIT_SECONDS=${REDIS_WAIT_SECONDS:-30}

log() {
    printf 'docker-entrypoint: %s\n' "$*" >&2
}

die() {
    log "$*"
    exit 1
}

require_seconds() {
    case $2 in
        '' | *[!0-9]*) die "$1 must be a whole number of seconds, got '$2'" ;;
    esac
}

now() {
    date +%s
}

# Sets `variable` to the environment variable that holds a secret: jwt_secret -> JWT_SECRET.
secret_variable() {
    case $1 in
        redis_password) variable=REDIS_PASSWORD ;;
        openai_api_key) variable=OPENAI_API_KEY ;;
        jwt_secret) variable=JWT_SECRET ;;
        *) die "REQUIRED_SECRETS names an unknown secret '$1' (known: redis_password openai_api_key jwt_secret)" ;;
    esac
}

# True when the variable holds something (set but empty counts as unset).
variable_is_set() {
    eval "[ -n \"\${$1:-}\" ]"
}

# True when the secret file exists and holds more than whitespace, as app.py reads it.
secret_file_present() {
    [ -r "$1" ] && grep -q '[^[:space:]]' "$1"
}

# Sets `missing` to the paths of the required secrets found neither in a file nor a variable.
find_missing_secrets() {
    missing=''
    for name in $REQUIRED_SECRETS; do
        secret_variable "$name"
        if ! variable_is_set "$variable" && ! secret_file_present "$SECRETS_DIR/$name"; then
            missing="$missing$SECRETS_DIR/$name "
        fi
    done
}

# Wait for the required secrets: Docker mounts them before start, but an orchestrator's secret
# agent (Vault, CSI driver) may write them a moment after the container starts. Bounded by
# SECRETS_WAIT_SECONDS, polled once a second; the variable, when set, makes the file optional.
wait_for_secrets() {
    deadline=$(($(now) + SECRETS_WAIT_SECONDS))
    find_missing_secrets
    if [ -n "$missing" ]; then
        log "waiting up to ${SECRETS_WAIT_SECONDS}s for secret file(s): ${missing% }"
    fi
    while [ -n "$missing" ]; do
        if [ "$(now)" -ge "$deadline" ]; then
            die "gave up after ${SECRETS_WAIT_SECONDS}s: missing secret file(s): ${missing% }" \
                "(or set the matching variable)"
        fi
        sleep 1
        find_missing_secrets
    done
}

# Export each secret file's stripped content under its variable; never echo the value.
export_secret_files() {
    for name in redis_password openai_api_key jwt_secret; do
        file=$SECRETS_DIR/$name
        secret_variable "$name"
        if [ -e "$file" ] && [ ! -r "$file" ]; then
            die "secret file $file exists but cannot be read by uid $(id -u)"
        fi
        if secret_file_present "$file"; then
            value=$(cat "$file")
            value=${value#"${value%%[![:space:]]*}"}
            value=${value%"${value##*[![:space:]]}"}
            export "$variable=$value"
            unset value
            log "$variable taken from $file"
        elif [ -e "$file" ]; then
            log "secret file $file is blank; ignoring it"
        fi
    done
}

# Sets redis_host and redis_port from REDIS_URL (which wins, as in app.py) or REDIS_HOST and
# REDIS_PORT; leaves redis_host empty when Redis is not configured or the URL cannot be read.
# redis://[[user]:password@]host[:port][/db][?query] and rediss://...; the URL is never logged,
# since it may carry the password.
find_redis() {
    redis_host=''
    redis_port=''
    if [ -n "${REDIS_URL:-}" ]; then
        case $REDIS_URL in
            redis://* | rediss://*) ;;
            *)
                log "REDIS_URL is not a redis:// or rediss:// URL; not waiting for Redis"
                return 0
                ;;
        esac
        authority=${REDIS_URL#*://}
        authority=${authority%%[/?#]*}
        authority=${authority##*@}
        case $authority in
            \[*\]:*) redis_host=${authority%%]*}; redis_port=${authority##*]:} ;;
            \[*\]) redis_host=${authority%]}; redis_port=6379 ;;
            *:*) redis_host=${authority%:*}; redis_port=${authority##*:} ;;
            *) redis_host=$authority; redis_port=6379 ;;
        esac
        redis_host=${redis_host#\[}
        case $redis_port in
            '' | *[!0-9]*) redis_host='' ;;
        esac
        if [ -z "$redis_host" ]; then
            log "REDIS_URL has no usable host and port; not waiting for Redis"
            return 0
        fi
    elif [ -n "${REDIS_HOST:-}" ]; then
        redis_host=$REDIS_HOST
        redis_port=${REDIS_PORT:-6379}
        case $redis_port in
            '' | *[!0-9]*) die "REDIS_PORT must be a port number, got '$redis_port'" ;;
        esac
    fi
}

# Wait for Redis: in compose or a pod it may start after this container. The service would run
# without it (answers degrade, /health says 503), but waiting here keeps the first probes green.
# Bounded by REDIS_WAIT_SECONDS; one TCP connect (1 s timeout) a second.
wait_for_redis() {
    if [ -z "$redis_host" ]; then
        return 0
    fi
    command -v nc >/dev/null 2>&1 || die "nc (netcat-openbsd) is needed to wait for redis at $redis_host:$redis_port"
    deadline=$(($(now) + REDIS_WAIT_SECONDS))
    until nc -z -w 1 "$redis_host" "$redis_port" >/dev/null 2>&1; do
        if [ "$(now)" -ge "$deadline" ]; then
            die "gave up after ${REDIS_WAIT_SECONDS}s: no TCP connection to redis at $redis_host:$redis_port"
        fi
        sleep 1
    done
    log "redis at $redis_host:$redis_port accepts connections"
}

require_seconds SECRETS_WAIT_SECONDS "$SECRETS_WAIT_SECONDS"
require_seconds REDIS_WAIT_SECONDS "$REDIS_WAIT_SECONDS"
[ "$#" -gt 0 ] || die "no command given (the image's CMD is: gunicorn app:app)"

# Tracing would print the secrets as they are read (and REDIS_URL may hold the Redis password):
# switch it off for that part only.
case $- in
    *x*) xtrace=on; set +x ;;
    *) xtrace=off ;;
esac
wait_for_secrets
export_secret_files
find_redis
if [ "$xtrace" = on ]; then
    set -x
fi

wait_for_redis

exec "$@"
