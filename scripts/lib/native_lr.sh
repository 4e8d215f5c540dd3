# PostgreSQL's own logical replication apply as a same-run baseline for scripts/bench: the
# workload is written on the source while the subscription is disabled, as a queue is filled
# while its job is stopped, then timed from ENABLE until the apply worker has committed the
# last transaction. A drain's clock starts only once its worker runs; this one starts before the
# apply worker exists, which costs it a few ms (each run's line shows how many).
# The publisher is database source, the subscriber database lr of the same cluster, so both
# share the machine exactly as source and target do in the drains.
# Needs from the caller: wal_level = logical; database source with mkrows(); TABLE_DDL, REPS;
# produce_inserts, produce_mix, copy_once, median, minimum (scripts/bench).

LR_SLOT=lr_slot

lr_setup() {
    [ "$(qv postgres "show wal_level")" = logical ] || { echo "native LR baseline: wal_level must be logical" >&2; exit 1; }
    # The launcher starts a subscription's worker at most once per wal_retrieve_retry_interval
    # (5 s), and a wake-up sooner than that waits a whole interval more: an ENABLE a few seconds
    # after the previous run's would spend those seconds on the clock doing nothing.
    q postgres -c "alter system set wal_retrieve_retry_interval = '20ms'" -c "select pg_reload_conf()" >/dev/null
    q postgres -c "create database lr"
    # no truncate in the publication: each run empties both sides itself
    q source -c "create table lr_all $TABLE_DDL" -c "create table lr_latest $TABLE_DDL" \
             -c "create publication lr_pub for table lr_all, lr_latest with (publish = 'insert, update, delete')"
    q lr -c "create table lr_all $TABLE_DDL" -c "create table lr_latest $TABLE_DDL"
    # The slot is not CREATE SUBSCRIPTION's to make: that would hang, the new slot waiting for
    # every running transaction of the cluster to end, CREATE SUBSCRIPTION's own included. Each
    # run makes it (lr_new_slot).
    # Not SRC_CONN: its SRC_OPTIONS are meant for the drains' source sessions.
    q lr -c "create subscription lr_sub connection 'host=$CL_DIR port=$CL_PORT dbname=source user=$CL_USER'
             publication lr_pub with (create_slot = false, slot_name = '$LR_SLOT', binary = true,
                                      copy_data = false, enabled = false)"
}

# A fresh slot right before each run's workload, so every run's walsender starts reading at the
# workload: an old slot would make it read again, inside the timing, the WAL of the previous
# run's apply and COPY (another database's, skipped, but read), back to its restart point.
lr_new_slot() {
    q source -c "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = '$LR_SLOT'" \
             -c "select pg_create_logical_replication_slot('$LR_SLOT', 'pgoutput')" >/dev/null
}

# Disables the subscription and waits until its apply worker and the walsender serving it have
# exited: the slot can be dropped only then, and a COPY timed next must not share the CPU with them.
lr_disable() {
    q lr -c "alter subscription lr_sub disable"
    local deadline=$(( $(date +%s) + 60 ))
    until [ "$(qv lr "select count(*) from pg_stat_subscription where subname = 'lr_sub' and pid is not null")" = 0 ] &&
          [ "$(qv source "select count(*) from pg_replication_slots where slot_name = '$LR_SLOT' and active")" = 0 ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "native LR: the apply worker did not stop" >&2; exit 1; }
        sleep 0.1
    done
}

# table producer events -> LR_RUN_EPS, LR_STARTUP (s from ENABLE until the apply worker ran)
lr_once() {
    local table=$1 producer=$2 events=$3
    q source -c "truncate $table"
    q lr -c "truncate $table"
    lr_new_slot
    "$producer" "$table"
    local lsn; lsn=$(qv source "select pg_current_wal_lsn()")
    # The clock starts right after ENABLE commits, in the same session: the launcher is woken
    # by that commit, so no apply can happen before it.
    local s; s=$(psql -X -q -A -t -v ON_ERROR_STOP=1 -d lr -c "alter subscription lr_sub enable" \
                      -c "select extract(epoch from clock_timestamp())")
    # Caught up once the subscriber has confirmed everything written up to the end of the
    # workload. Polled coarsely so that this script does not compete with the apply for the CPU:
    # the end time comes from the server, not from here.
    local deadline=$(( $(date +%s) + 900 ))
    until [ "$(qv source "select confirmed_flush_lsn >= '$lsn' from pg_replication_slots where slot_name = '$LR_SLOT'")" = t ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "native LR apply of $table timed out" >&2; tail -20 "$CL_DIR/server.log" >&2; exit 1; }
        sleep 1
    done
    # The apply worker reports itself idle right after each commit, and nothing else changes
    # its state while it waits, so state_change is the end of the last transaction's apply.
    # (Not pg_xact_commit_timestamp: applied transactions keep the origin's commit time.)
    local e b
    IFS="|" read -r e b < <(qv lr "select extract(epoch from a.state_change), extract(epoch from a.backend_start)
                           from pg_stat_subscription s join pg_stat_activity a using (pid)
                           where s.subname = 'lr_sub' and s.relid is null and a.state = 'idle'")
    [ -n "${e:-}" ] || { echo "native LR: no idle apply worker after catching up" >&2; exit 1; }
    lr_disable
    LR_RUN_EPS=$(echo "$events / ($e - $s)" | bc)
    LR_STARTUP=$(LC_ALL=C printf '%.3f' "$(echo "$b - $s" | bc)")
    # what was timed is right: the subscriber's rows equal the source's
    local a; a=$(qv source "select count(*) || ':' || coalesce(sum(hashtext(x::text)), 0) from $table x")
    local z; z=$(qv lr "select count(*) || ':' || coalesce(sum(hashtext(x::text)), 0) from $table x")
    [ "$a" = "$z" ] || { echo "MISMATCH native LR $table: source $a subscriber $z" >&2; exit 1; }
}

# workload (insert: keep_all's, mix: keep_latest's) events -> LR_EPS (median apply events/s),
# LR_COPY (median COPY rows/s), LR_RATIO (median ratio), LR_MIN (worst ratio). As paired_runs
# in scripts/bench: each run is paired with a COPY of the subscriber's resulting rows timed
# right after it, so a ratio compares two runs under the same machine conditions.
lr_paired_runs() {
    local workload=$1 events=$2 table producer applies= copies= ratios=
    case $workload in
        insert) table=lr_all producer=produce_inserts ;;
        mix) table=lr_latest producer=produce_mix ;;
        *) echo "lr_paired_runs: unknown workload $workload" >&2; exit 1 ;;
    esac
    for rep in $(seq "$REPS"); do
        lr_once "$table" "$producer" "$events"
        copy_once "$table" "$rep" lr
        applies="$applies $LR_RUN_EPS"
        copies="$copies $COPY_RPS"
        ratios="$ratios $(echo "scale=3; $LR_RUN_EPS / $COPY_RPS" | bc)"
        echo "# native LR $workload run $rep: $LR_RUN_EPS events/s (apply worker up ${LR_STARTUP} s after ENABLE), COPY $COPY_RPS rows/s" >&2
    done
    LR_EPS=$(echo "$applies" | median); LR_COPY=$(echo "$copies" | median)
    LR_RATIO=$(echo "$ratios" | median); LR_MIN=$(echo "$ratios" | minimum)
}
