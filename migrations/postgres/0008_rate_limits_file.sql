-- On SQLite the shared rate limits moved to a file of their own beside the database, so that
-- a reservation never waits for the database's one writer. On Postgres they stay in
-- `rate_slots` and `rate_budgets`: a reservation locks one row and waits for no one else's
-- transaction. Nothing changes here; the file keeps both backends' migrations in step.
SELECT 1;
