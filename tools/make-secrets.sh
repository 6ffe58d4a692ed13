#!/bin/sh
# Writes the secret files that docker-compose.yml mounts: secrets/redis_password.txt and
# secrets/jwt_secret.txt (random, 32 bytes as hex) and secrets/openai_api_key.txt (from
# $OPENAI_API_KEY, else a placeholder to replace). An existing file is never overwritten, and no
# value is ever printed. `make run` and `make token` use secrets/jwt_secret.txt too (and write it
# when missing), so a token from `make token` works against both.
#
#   tools/make-secrets.sh [DIR]      DIR defaults to secrets/ at the repository root
#
# Modes: the folder is 0700, so other users of this machine cannot reach the files; the files are
# 0644, because compose bind-mounts them as they are and the containers read them as their own
# non-root users (10001 for image-service, redis for redis), not as the owner of the file.
set -eu

dir=${1:-$(dirname "$0")/../secrets}
placeholder=change-me-openai-api-key

say() {
    printf 'make-secrets: %s\n' "$*" >&2
}

random_hex() {
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n'
}

# Creates $1 holding $2, unless it exists; noclobber makes the check and the write one step.
write_secret() {
    if (set -C && printf '%s\n' "$2" >"$1") 2>/dev/null; then
        chmod 0644 "$1"
        say "wrote $1"
    elif [ -e "$1" ]; then
        say "kept $1 (it exists)"
    else
        say "cannot write $1"
        exit 1
    fi
}

mkdir -p "$dir"
chmod 0700 "$dir"

write_secret "$dir/redis_password.txt" "$(random_hex)"
write_secret "$dir/jwt_secret.txt" "$(random_hex)"
if [ -n "${OPENAI_API_KEY:-}" ]; then
    write_secret "$dir/openai_api_key.txt" "$OPENAI_API_KEY"
else
    write_secret "$dir/openai_api_key.txt" "$placeholder"
fi
if grep -qx "$placeholder" "$dir/openai_api_key.txt"; then
    say "note: $dir/openai_api_key.txt holds a placeholder; put your OpenAI API key in it" \
        "(or rerun with OPENAI_API_KEY set after deleting the file)"
fi
