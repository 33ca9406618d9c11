# Shell helpers shared by the loadtest scripts (sourced, not run).

# Waits (up to a minute: a node under valgrind starts slowly) for a line matching pattern $2
# (default "https://") in log $1, and prints the address that follows it.
address() {
    local pattern=${2:-https://}
    for _ in $(seq 600); do
        if grep -q "$pattern" "$1"; then
            grep -o "$pattern[0-9.:]*" "$1" | head -1 | sed "s|$pattern||"
            return
        fi
        sleep 0.1
    done
    echo "no address in $1:" >&2
    cat "$1" >&2
    exit 1
}

# A TCP port free on 127.0.0.1 now (for servers that take a fixed port).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Distributed mode: starts a throw-away redis-server in directory $1 pinned to core $2
# (append-only, `appendfsync always`, as a Redis that must not lose an acknowledged change
# runs), waits for it, sets `redis_pid` and exports KEYGATE_REDIS__URL for every node and CLI
# call that follows. The caller kills `redis_pid`.
start_redis() {
    local dir=$1 cpu=$2 port
    command -v redis-server >/dev/null || { echo "distributed mode needs redis-server (apt-get install redis-server)" >&2; exit 1; }
    port=$(free_port)
    mkdir -p "$dir"
    (cd "$dir" && exec taskset -c "$cpu" redis-server --port "$port" --bind 127.0.0.1 --dir . \
        --appendonly yes --appendfsync always --save "" >redis.log 2>&1) &
    redis_pid=$!
    for _ in $(seq 100); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
    redis-cli -p "$port" ping | grep -q PONG || { echo "redis-server did not start:" >&2; cat "$dir/redis.log" >&2; exit 1; }
    export KEYGATE_REDIS__URL=redis://127.0.0.1:$port/
}

# PostgreSQL as the main store: creates a throw-away cluster in directory $1 (its server on
# core $2, durable settings as in production: fsync and synchronous_commit on), starts it, sets
# `pg_dir` and exports KEYGATE_STORE__POSTGRES_URL for every node and CLI call that follows.
# The caller runs `stop_postgres`. initdb refuses root: as root it runs as user postgres.
start_postgres() {
    local dir=$1 cpu=$2 port bin as=()
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -x "$bin/initdb" ] || { echo "PostgreSQL's server binaries are missing (apt-get install postgresql)" >&2; exit 1; }
    port=$(free_port)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        # The server runs as postgres: it must reach its directory (the caller's is throw-away).
        chmod o+x "$(dirname "$dir")"
        chown postgres:postgres "$dir"
        as=(runuser -u postgres --)
    fi
    "${as[@]}" "$bin/initdb" -D "$dir/data" -A trust -U keygate --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n" "$port" "$dir" \
        >>"$dir/data/postgresql.auto.conf"
    taskset -c "$cpu" "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    pg_dir=$dir
    pg_ctl_cmd=("${as[@]}" "$bin/pg_ctl")
    export KEYGATE_STORE__POSTGRES_URL=postgres://keygate@127.0.0.1:$port/postgres
}

stop_postgres() {
    if [ -n "${pg_dir:-}" ]; then "${pg_ctl_cmd[@]}" -D "$pg_dir/data" -m immediate -w stop >/dev/null 2>&1 || true; fi
}
