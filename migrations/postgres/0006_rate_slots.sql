-- Rate limits shared by every process using one database (several `serve` replicas, a `resync`
-- beside `serve`). Times are wall-clock microseconds since the Unix epoch, so hosts sharing a
-- Postgres database must keep their clocks in sync (NTP).
--
-- rate_slots: one row per limiter key (`healthie`, `healthie:bulk`, ...), holding the GCRA
-- "theoretical arrival time": a caller reserves the next slot by moving it on by one interval.
-- A rate-limit answer pushes it to the end of the pause, so every process waits it out.
CREATE TABLE rate_slots (
    key    TEXT PRIMARY KEY,
    tat_us BIGINT NOT NULL
);

-- rate_budgets: requests used of a daily allowance (IntakeQ's 500 a day), per key, in the
-- window ending at `window_end_us`.
CREATE TABLE rate_budgets (
    key           TEXT PRIMARY KEY,
    window_end_us BIGINT NOT NULL,
    used          BIGINT NOT NULL
);
