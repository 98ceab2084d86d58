-- `patient_history` is read by `valid_from` (what was true on a date: `valid_from <= d` and
-- `valid_to` NULL or after `d`; changes since a date) and by `patient_id`. An index on
-- `valid_to` served no query, cost a write whenever a version closed, and led SQLite's planner
-- to scan every open version when closing a few of them by patient id.
DROP INDEX IF EXISTS patient_history_valid_to;
