#!/usr/bin/env bash
# A throwaway PostgreSQL server for the queue tests, on 127.0.0.1 only.
#
#   eval "$(bash scripts/postgres_test_server.sh start)"   # exports LAZARUS_TEST_POSTGRES(_DIR)
#   cargo test --test integration queue::queue_contract::  # PostgreSQL variants now run
#   bash scripts/postgres_test_server.sh stop              # stops it, removes its folder
#
# `start` installs Debian's postgresql package when no initdb is found and we
# are root, initialises a cluster in a fresh temp folder (trust auth, fsync
# off: the data is thrown away), starts it on a free port as the `postgres`
# user when run as root, and prints the export lines on stdout (everything
# else goes to stderr).
set -euo pipefail

find_bin() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$found" && -x "$found/initdb" ]]; then
        echo "$found"
    elif command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    fi
}

# Runs a command as the server's owner: `postgres` when we are root.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    local bin
    bin=$(find_bin)
    if [[ -z "$bin" ]]; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            echo "installing postgresql (apt-get)" >&2
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
            bin=$(find_bin)
        fi
        if [[ -z "$bin" ]]; then
            echo "no PostgreSQL found: install it (Debian: apt-get install postgresql)" >&2
            exit 1
        fi
    fi
    if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home postgres
    fi
    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/lazarus-postgres.XXXXXX")
    chmod 755 "$dir"
    [[ $(id -u) -eq 0 ]] && chown postgres "$dir"
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 \
        --no-sync >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        start >&2 || { cat "$dir/server.log" >&2; exit 1; }
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $dir)" >&2
    echo "export LAZARUS_TEST_POSTGRES=postgres://postgres@127.0.0.1:$port/postgres"
    echo "export LAZARUS_TEST_POSTGRES_DIR=$dir"
}

stop() {
    local dir=${1:-${LAZARUS_TEST_POSTGRES_DIR:-}}
    if [[ -z "$dir" || ! -d "$dir/data" ]]; then
        echo "no test server to stop (LAZARUS_TEST_POSTGRES_DIR unset)" >&2
        return 0
    fi
    local bin
    bin=$(find_bin)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *)
        echo "usage: $0 start | stop [DIR]" >&2
        exit 2
        ;;
esac
