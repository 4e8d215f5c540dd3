-- 0.3.0 -> 0.4.0: events of operations a job does not apply (event_types, ignore_truncate) are
-- counted in job_state and the status view, so are values of columns new_columns = ignore left
-- out; import_ini() translates a Skytools ini file.

CREATE FUNCTION cube_dispatcher."import_ini"(
	"ini" TEXT
) RETURNS TABLE (
	"statement" TEXT
)
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'import_ini_wrapper';

-- Changes nothing, reads nothing but its argument: anyone may call it.
REVOKE EXECUTE ON FUNCTION cube_dispatcher.import_ini(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cube_dispatcher.import_ini(text) TO PUBLIC;

ALTER TABLE cube_dispatcher.job_state ADD COLUMN events_skipped bigint NOT NULL DEFAULT 0,
    ADD COLUMN values_ignored bigint NOT NULL DEFAULT 0;

-- Replaced, not dropped: one column is added at the end, and the grants a DBA made on the view
-- stay.
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
       s.old_events_skipped,
       s.events_skipped,
       s.values_ignored
FROM cube_dispatcher.job j
LEFT JOIN cube_dispatcher.job_state s USING (job_name);
