# Shared by scripts/demo and scripts/bench: a throwaway PostgreSQL 15 cluster with cube_dispatcher
# preloaded. Runs the server as `postgres` when we are root (PostgreSQL refuses root).
# Usage: cluster_start <name> [extra postgresql.conf lines...]; the EXIT trap tears it down.
PGBIN=/usr/lib/postgresql/15/bin

# (pgrx prints a Rust backtrace with every error when RUST_BACKTRACE is set: keep it out of the server)
as_owner() { if [ "$(id -u)" = 0 ]; then env -u RUST_BACKTRACE runuser -u postgres -- "$@"; else env -u RUST_BACKTRACE "$@"; fi; }

cluster_start() {
    local name=$1; shift
    CL_DIR=$(mktemp -d "/tmp/cube-dispatcher-$name-XXXXXX")
    CL_PORT=$(( 46000 + RANDOM % 2000 ))
    [ "$(id -u)" = 0 ] && chown postgres: "$CL_DIR"
    CL_USER=$( [ "$(id -u)" = 0 ] && echo postgres || id -un )
    trap cluster_stop EXIT
    as_owner "$PGBIN/initdb" -D "$CL_DIR/data" -A trust -U "$CL_USER" -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null
    {
        echo "port = $CL_PORT"
        echo "unix_socket_directories = '$CL_DIR'"
        echo "listen_addresses = ''"
        echo "shared_preload_libraries = 'cube_dispatcher'"
        echo "max_worker_processes = 32"
        echo "log_line_prefix = '%m [%p] %b '"
        for line in "$@"; do echo "$line"; done
    } >> "$CL_DIR/data/postgresql.conf"
    # CPUS=<list> (taskset's): the server and every process it starts run on those CPUs only,
    # e.g. CPUS=0 for a one-CPU server
    as_owner ${CPUS:+taskset -c "$CPUS"} "$PGBIN/pg_ctl" -D "$CL_DIR/data" -l "$CL_DIR/server.log" -w start >/dev/null
    export PGHOST=$CL_DIR PGPORT=$CL_PORT PGUSER=$CL_USER
    SRC_CONN="host=$CL_DIR port=$CL_PORT dbname=source user=$CL_USER${SRC_OPTIONS:+ $SRC_OPTIONS}"
}

cluster_stop() {
    set +e   # a teardown step that fails must not skip the others
    [ -n "${CL_DIR:-}" ] || return 0
    # SERVER_LOG=<file> keeps the server log of the run
    [ -n "${SERVER_LOG:-}" ] && cp "$CL_DIR/server.log" "$SERVER_LOG"
    [ -f "$CL_DIR/pgqd.pid" ] && kill "$(cat "$CL_DIR/pgqd.pid")" 2>/dev/null
    pkill -f "pgqd.*$CL_DIR/" 2>/dev/null
    [ -n "${PGQD_PID:-}" ] && wait "$PGQD_PID" 2>/dev/null
    as_owner "$PGBIN/pg_ctl" -D "$CL_DIR/data" -m fast -w stop >/dev/null 2>&1 \
        || as_owner "$PGBIN/pg_ctl" -D "$CL_DIR/data" -m immediate -w stop >/dev/null 2>&1
    rm -rf "$CL_DIR"
    CL_DIR=
}

q()  { psql -X -q -v ON_ERROR_STOP=1 -d "$@"; }           # q <db> -c "..." / heredoc
qv() { psql -X -q -A -t -v ON_ERROR_STOP=1 -d "$1" -c "$2"; } # one value

# Waits until consumer $2 has finished every batch of queue $1 (timeout $3 s, default 600).
wait_caught_up() {
    local deadline=$(( $(date +%s) + ${3:-600} ))
    until [ "$(qv source "select (c.current_batch is null and c.last_tick = q.last_tick_id) from pgq.get_consumer_info('$1', '$2') c, pgq.get_queue_info('$1') q")" = t ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "timeout waiting for $2 on $1" >&2; tail -20 "$CL_DIR/server.log" >&2; return 1; }
        sleep 0.05
    done
}

now() { date +%s.%N; }

# The real ticker, in the foreground of a background job so teardown can wait for it.
pgqd_start() {
    cat > "$CL_DIR/pgqd.ini" <<INI
[pgqd]
base_connstr = host=$CL_DIR port=$CL_PORT user=$CL_USER
database_list = source
logfile = $CL_DIR/pgqd.log
pidfile = $CL_DIR/pgqd.pid
ticker_period = 0.5
INI
    [ "$(id -u)" = 0 ] && chown postgres: "$CL_DIR/pgqd.ini"
    as_owner pgqd "$CL_DIR/pgqd.ini" >/dev/null 2>&1 &
    PGQD_PID=$!
    for _ in $(seq 50); do [ -s "$CL_DIR/pgqd.pid" ] && break; sleep 0.1; done
}
