-- Job definitions: what cube_dispatcher.start() read from the settings, validated.
CREATE TABLE cube_dispatcher.job (
    job_name            text PRIMARY KEY CHECK (job_name ~ '^[a-z_][a-z0-9_]*$' AND length(job_name) <= 40),
    -- every option's setting text (null: unset), validated; see cube_dispatcher.options()
    options             jsonb NOT NULL CHECK (jsonb_typeof(options) = 'object'),
    run_as              oid NOT NULL,           -- the role that called start(); the worker connects as it
    enabled             boolean NOT NULL,       -- false after stop()/kill(): not resumed
    config_version      bigint NOT NULL DEFAULT 1,
    defined_at          timestamptz NOT NULL DEFAULT now()
);

-- Progress, written by the worker. last_tick_id is written in the same transaction as the
-- batch's rows: it is what makes a batch apply exactly once.
CREATE TABLE cube_dispatcher.job_state (
    job_name        text PRIMARY KEY REFERENCES cube_dispatcher.job ON DELETE CASCADE,
    last_tick_id    bigint,
    last_batch_id   bigint,
    last_batch_end  timestamptz,
    last_batch_at   timestamptz,            -- when the last batch was written here
    batches_done    bigint NOT NULL DEFAULT 0,
    events_done     bigint NOT NULL DEFAULT 0,
    lag             interval,
    recent_eps      float8,
    state           text NOT NULL DEFAULT 'stopped' CHECK (state IN ('running', 'retrying', 'stopped')),
    pid             integer,
    started_at      timestamptz,
    last_error      text,
    last_error_at   timestamptz,
    updated_at      timestamptz,
    old_events_skipped bigint NOT NULL DEFAULT 0, -- ignore_old_events: events for partitions past retention
    events_skipped  bigint NOT NULL DEFAULT 0, -- event_types, ignore_truncate: events of operations not applied
    values_ignored  bigint NOT NULL DEFAULT 0  -- new_columns = ignore: values of columns the target lacks
);

-- Events a job with on_error = dead_letter could not write, kept with the reason, in the same
-- transaction as the rest of their batch. replay_dead_letters() writes them once fixed.
CREATE TABLE cube_dispatcher.dead_letter (
    id          bigserial PRIMARY KEY,
    job_name    text NOT NULL REFERENCES cube_dispatcher.job ON DELETE CASCADE,
    batch_id    bigint NOT NULL,
    suffix      text,                   -- the batch's partition suffix, so a replay goes where the batch went
    ev_id       bigint NOT NULL,
    ev_time     timestamptz,
    ev_type     text,
    ev_data     text,
    ev_extra1   text,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON cube_dispatcher.dead_letter (job_name, ev_id);

-- The partitions each job created, with the period each covers: what retention_period may drop
-- (besides the Python tool's tables of the same names). A row goes when its table is dropped.
CREATE TABLE cube_dispatcher.partition (
    job_name        text NOT NULL REFERENCES cube_dispatcher.job ON DELETE CASCADE,
    parent          text NOT NULL,          -- schema-qualified, quoted as identifiers
    partition       text NOT NULL,          -- likewise
    suffix          text NOT NULL,
    period_start    timestamptz,            -- NULL when the job's period is not known
    period_end      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_name, partition)
);

CREATE VIEW cube_dispatcher.partitions AS
SELECT job_name, parent, partition, period_start, period_end, created_at,
       to_regclass(partition) IS NOT NULL AS present
FROM cube_dispatcher.partition;

CREATE VIEW cube_dispatcher.status AS
SELECT j.job_name,
       CASE WHEN s.pid IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = s.pid)
            THEN 'stopped' ELSE coalesce(s.state, 'stopped') END AS state,
       s.pid,
       j.options->>'pgq_queue_name' AS queue,
       j.options->>'pgq_consumer_id' AS consumer,
       j.options->>'mode' AS mode,
       j.options->>'dateformat' AS dateformat,
       CASE WHEN pg_has_role(current_user, j.run_as, 'MEMBER')
            THEN cube_dispatcher.mask_password(j.options->>'src_db') END AS src_db,
       s.started_at,
       s.last_batch_id,
       s.last_batch_end,
       s.last_batch_at,
       s.batches_done,
       s.events_done,
       s.recent_eps AS events_per_second,
       s.lag,
       s.last_error,
       s.last_error_at,
       (SELECT count(*) FROM cube_dispatcher.dead_letter d WHERE d.job_name = j.job_name) AS dead_letters,
       j.options->>'on_error' AS on_error,
       cube_dispatcher.shown_options(j.options, pg_has_role(current_user, j.run_as, 'MEMBER')) AS options,
       s.old_events_skipped,
       s.events_skipped,
       s.values_ignored
FROM cube_dispatcher.job j
LEFT JOIN cube_dispatcher.job_state s USING (job_name);

REVOKE ALL ON cube_dispatcher.job, cube_dispatcher.job_state, cube_dispatcher.dead_letter,
    cube_dispatcher.partition, cube_dispatcher.partitions FROM PUBLIC;
