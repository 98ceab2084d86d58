-- The shared rate limits moved to a file of their own beside the database
-- (`<database file>.limits`, created by the store), so that reserving a request slot never
-- waits for this file's writer. The rows here held only current state; they are dropped, and
-- a daily allowance is counted afresh in the new file from the upgrade on.
DROP TABLE IF EXISTS rate_slots;
DROP TABLE IF EXISTS rate_budgets;
