-- cube_dispatcher 0.1.0 -> 0.2.0. Job definitions, positions, state and dead letters stay as they are.

-- The control functions resolve names through a fixed search_path, whoever calls them (README,
-- "Security model"). 0.2.0's library also pins it inside the functions; this makes the
-- definitions say so too.
ALTER FUNCTION cube_dispatcher.start(text) SET search_path TO pg_catalog, pg_temp;
ALTER FUNCTION cube_dispatcher.stop(text) SET search_path TO pg_catalog, pg_temp;
ALTER FUNCTION cube_dispatcher.kill(text) SET search_path TO pg_catalog, pg_temp;
ALTER FUNCTION cube_dispatcher.reload(text) SET search_path TO pg_catalog, pg_temp;
ALTER FUNCTION cube_dispatcher."drop"(text) SET search_path TO pg_catalog, pg_temp;
ALTER FUNCTION cube_dispatcher.replay_dead_letters(text) SET search_path TO pg_catalog, pg_temp;

-- loop_delay = 0 (ask for the next batch at once), as the original accepted.
ALTER TABLE cube_dispatcher.job
    DROP CONSTRAINT job_loop_delay_check,
    ADD CONSTRAINT job_loop_delay_check CHECK (loop_delay >= 0);

-- 'starting' was never written.
ALTER TABLE cube_dispatcher.job_state
    DROP CONSTRAINT job_state_state_check,
    ADD CONSTRAINT job_state_state_check CHECK (state IN ('running', 'retrying', 'stopped'));
