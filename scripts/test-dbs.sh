#!/usr/bin/env bash
# Run CMD... with a throwaway PostgreSQL and MariaDB, exporting
#   SPAWNMESH_TEST_POSTGRES_URL   postgresql+psycopg://postgres@127.0.0.1:PORT/spawnmesh_test
#   SPAWNMESH_TEST_MYSQL_URL      mysql+pymysql://spawnmesh:spawnmesh@127.0.0.1:PORT/spawnmesh_test
# Servers live in a temp dir on free loopback ports with durability off, and are always stopped
# (trap). A server that cannot start is skipped with a warning (its tests then skip). A URL that
# is already set is used as is and nothing is started for it. Exits with CMD's status.
# Needs root for the servers (PostgreSQL runs as `postgres`, MariaDB as `mysql`); installs
# mariadb-server with apt-get when mariadbd is missing. SPAWNMESH_TEST_DBS=none starts nothing.
set -u

if [ "$#" -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

TMP="$(mktemp -d /tmp/spawnmesh-test-dbs.XXXXXX)"
chmod 755 "$TMP"
PG_BIN=""
PG_STARTED=""
MY_PID=""

warn() { echo "test-dbs: WARNING: $*" >&2; }
info() { echo "test-dbs: $*" >&2; }

cleanup() {
    if [ -n "$PG_STARTED" ]; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$TMP/pg/data" -m immediate -w stop \
            >/dev/null 2>&1 || true
    fi
    if [ -n "$MY_PID" ]; then
        kill "$MY_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$MY_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$MY_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start_postgres() {
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
        warn "PostgreSQL not found under /usr/lib/postgresql/*/bin; Postgres tests will skip"
        return 1
    fi
    if [ "$(id -u)" -ne 0 ] || ! id postgres >/dev/null 2>&1; then
        warn "need root and a 'postgres' user to start PostgreSQL; Postgres tests will skip"
        return 1
    fi
    local port dir="$TMP/pg"
    port="$(free_port)"
    mkdir -p "$dir" && chown postgres "$dir"
    if ! runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 \
            --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1; then
        warn "PostgreSQL initdb failed (see below); Postgres tests will skip"
        tail -n 5 "$dir/initdb.log" >&2
        return 1
    fi
    if ! runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 30 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
            start >/dev/null 2>&1; then
        warn "PostgreSQL did not start (see below); Postgres tests will skip"
        tail -n 5 "$dir/log" >&2
        return 1
    fi
    PG_STARTED=1
    runuser -u postgres -- "$PG_BIN/psql" -h "$dir" -p "$port" -U postgres -qAt \
        -c "CREATE DATABASE spawnmesh_test" >/dev/null
    export SPAWNMESH_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/spawnmesh_test"
    info "PostgreSQL ($(basename "$(dirname "$PG_BIN")")) on 127.0.0.1:$port"
}

ensure_mariadb() {
    command -v mariadbd >/dev/null 2>&1 && return 0
    if [ "$(id -u)" -ne 0 ]; then
        warn "mariadbd is missing and installing it needs root; MariaDB tests will skip"
        return 1
    fi
    info "installing mariadb-server (once per machine)..."
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends mariadb-server >"$TMP/apt.log" 2>&1; then
        apt-get update >>"$TMP/apt.log" 2>&1
        apt-get install -y --no-install-recommends mariadb-server >>"$TMP/apt.log" 2>&1 || {
            warn "apt-get install mariadb-server failed (see below); MariaDB tests will skip"
            tail -n 5 "$TMP/apt.log" >&2
            return 1
        }
    fi
    # The package may start a system server; we run our own and leave that one alone.
    command -v mariadbd >/dev/null 2>&1
}

start_mariadb() {
    ensure_mariadb || return 1
    local port dir="$TMP/my" user=mysql
    id mysql >/dev/null 2>&1 || user=root
    port="$(free_port)"
    mkdir -p "$dir/data" && chown -R "$user" "$dir"
    local installer
    installer="$(command -v mariadb-install-db || command -v mysql_install_db)"
    if ! "$installer" --no-defaults --user="$user" --datadir="$dir/data" --auth-root-authentication-method=normal \
            --skip-test-db >"$dir/install.log" 2>&1; then
        warn "mariadb-install-db failed (see below); MariaDB tests will skip"
        tail -n 5 "$dir/install.log" >&2
        return 1
    fi
    mariadbd --no-defaults --user="$user" --datadir="$dir/data" --socket="$dir/sock" \
        --pid-file="$dir/pid" --port="$port" --bind-address=127.0.0.1 --skip-name-resolve \
        --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --sync-binlog=0 \
        --innodb-buffer-pool-size=128M --max-connections=300 --log-error="$dir/err.log" \
        >/dev/null 2>&1 &
    MY_PID=$!
    local ok=""
    for _ in $(seq 1 150); do
        if mariadb-admin --no-defaults --socket="$dir/sock" -uroot ping >/dev/null 2>&1; then
            ok=1; break
        fi
        kill -0 "$MY_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$ok" ]; then
        warn "MariaDB did not start (see below); MariaDB tests will skip"
        tail -n 5 "$dir/err.log" >&2
        return 1
    fi
    mariadb --no-defaults --socket="$dir/sock" -uroot -e "
        CREATE DATABASE spawnmesh_test CHARACTER SET utf8mb4;
        CREATE USER 'spawnmesh'@'%' IDENTIFIED BY 'spawnmesh';
        GRANT ALL PRIVILEGES ON *.* TO 'spawnmesh'@'%';" || {
        warn "could not create the MariaDB test database; MariaDB tests will skip"
        return 1
    }
    export SPAWNMESH_TEST_MYSQL_URL="mysql+pymysql://spawnmesh:spawnmesh@127.0.0.1:$port/spawnmesh_test"
    info "MariaDB ($(mariadbd --version 2>/dev/null | awk '{print $3}')) on 127.0.0.1:$port"
}

if [ "${SPAWNMESH_TEST_DBS:-}" != "none" ]; then
    if [ -n "${SPAWNMESH_TEST_POSTGRES_URL:-}" ]; then
        info "using SPAWNMESH_TEST_POSTGRES_URL from the environment"
    else
        start_postgres || unset SPAWNMESH_TEST_POSTGRES_URL
    fi
    if [ -n "${SPAWNMESH_TEST_MYSQL_URL:-}" ]; then
        info "using SPAWNMESH_TEST_MYSQL_URL from the environment"
    else
        start_mariadb || unset SPAWNMESH_TEST_MYSQL_URL
    fi
fi

"$@"
status=$?
exit "$status"
