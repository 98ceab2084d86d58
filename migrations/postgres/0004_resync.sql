-- Full resync: one lease row per source (a single resync per source at a time, across
-- processes), the pass counter, and per-record marks of which pass last listed a record and
-- how many completed passes in a row have not.

CREATE TABLE resync_runs (
    source             TEXT PRIMARY KEY,
    owner              TEXT,
    leased_until_ms    BIGINT,
    -- The current (or last) pass; a new pass increments it.
    pass               BIGINT NOT NULL DEFAULT 0,
    -- 1 while `pass` is started and not completed (a resumed run continues it).
    in_progress        BIGINT NOT NULL DEFAULT 0,
    pass_started_at_ms BIGINT,
    completed_pass     BIGINT NOT NULL DEFAULT 0
);

-- The last resync pass that listed the record.
ALTER TABLE source_records ADD COLUMN resync_pass BIGINT;
-- Completed passes in a row that did not list it (0: not missing), and the last pass counted.
ALTER TABLE source_records ADD COLUMN missing_passes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE source_records ADD COLUMN missing_checked_pass BIGINT;
-- When a completed pass first found it missing.
ALTER TABLE source_records ADD COLUMN missing_since TIMESTAMPTZ;
