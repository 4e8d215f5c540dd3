-- cube_dispatcher 0.2.0 -> 0.3.0. A job's options are stored as one jsonb object of setting
-- texts (see cube_dispatcher.options()); positions, state and dead letters stay as they are.

-- New functions: the option list, and the status view's masking of connection strings.
CREATE FUNCTION cube_dispatcher."options"() RETURNS TABLE (
	"option" TEXT,
	"default_value" TEXT,
	"takes_effect" TEXT,
	"description" TEXT
)
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'options_wrapper';

CREATE FUNCTION cube_dispatcher."shown_options"(
	"options" jsonb,
	"connections" bool
) RETURNS jsonb
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'shown_options_wrapper';

-- Both are documentation and display: anyone may call them (the status view calls the second
-- with its reader's rights).
REVOKE EXECUTE ON FUNCTION cube_dispatcher."options"(), cube_dispatcher.shown_options(jsonb, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cube_dispatcher."options"(), cube_dispatcher.shown_options(jsonb, boolean) TO PUBLIC;

-- Each stored value as the setting text that gives it: numbers through numeric, so the text does
-- not depend on the session's extra_float_digits. dst_db was not stored: unset.
ALTER TABLE cube_dispatcher.job ADD COLUMN options jsonb;
UPDATE cube_dispatcher.job SET options = jsonb_build_object(
    'src_db', src_db,
    'pgq_queue_name', pgq_queue_name,
    'pgq_consumer_id', pgq_consumer_id,
    'mode', mode,
    'dateformat', dateformat,
    'part_template', part_template,
    'loop_delay', loop_delay::numeric::text,
    'connection_lifetime', connection_lifetime::numeric::text,
    'dst_db', NULL::text,
    'log_level', log_level,
    'on_error', on_error,
    'tables', tables,
    'lock_timeout', lock_timeout::numeric::text);
ALTER TABLE cube_dispatcher.job
    ALTER COLUMN options SET NOT NULL,
    ADD CONSTRAINT job_options_check CHECK (jsonb_typeof(options) = 'object');

-- ignore_old_events counts what it skips.
ALTER TABLE cube_dispatcher.job_state ADD COLUMN old_events_skipped bigint NOT NULL DEFAULT 0;

-- The partitions each job creates from now on, for retention_period.
CREATE TABLE cube_dispatcher.partition (
    job_name        text NOT NULL REFERENCES cube_dispatcher.job ON DELETE CASCADE,
    parent          text NOT NULL,
    partition       text NOT NULL,
    suffix          text NOT NULL,
    period_start    timestamptz,
    period_end      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_name, partition)
);
CREATE VIEW cube_dispatcher.partitions AS
SELECT job_name, parent, partition, period_start, period_end, created_at,
       to_regclass(partition) IS NOT NULL AS present
FROM cube_dispatcher.partition;
REVOKE ALL ON cube_dispatcher.partition, cube_dispatcher.partitions FROM PUBLIC;

-- Replaced, not dropped: the columns stay the same (one is added at the end), and so do the
-- grants a DBA made on the view.
CREATE OR REPLACE VIEW cube_dispatcher.status AS
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
       s.old_events_skipped
FROM cube_dispatcher.job j
LEFT JOIN cube_dispatcher.job_state s USING (job_name);

ALTER TABLE cube_dispatcher.job
    DROP COLUMN src_db,
    DROP COLUMN pgq_queue_name,
    DROP COLUMN pgq_consumer_id,
    DROP COLUMN mode,
    DROP COLUMN dateformat,
    DROP COLUMN part_template,
    DROP COLUMN loop_delay,
    DROP COLUMN connection_lifetime,
    DROP COLUMN lock_timeout,
    DROP COLUMN log_level,
    DROP COLUMN on_error,
    DROP COLUMN tables;
